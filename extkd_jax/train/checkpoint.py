"""Orbax checkpoints of the train state plus a JSON record of where the run stands.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a checkpoint is never
half-written. Restoring tries the newest step first and falls back to older ones, with a warning, when a step
cannot be read (a partial or corrupted directory); a later save of that step replaces the unreadable one.
"""

from __future__ import annotations

import logging
import pathlib
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves and restores `{"state": pytree, "meta": json}` under `workdir/checkpoints`."""

    def __init__(self, workdir: str | pathlib.Path, keep: int = 2):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        # cleanup_tmp_directories: a `<step>.orbax-checkpoint-tmp-*` directory left by a run killed mid-save is
        # deleted when the next run starts (one trainer per workdir, so no save of another run is in flight)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.unreadable: set[int] = set()  # steps restore_latest could not read: save() replaces them

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        if step in self.manager.all_steps():
            if step not in self.unreadable:
                return
            log.warning("replacing the unreadable checkpoint step %d in %s", step, self.directory)
            self.manager.delete(step)
            self.unreadable.discard(step)
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore_latest(self, target: Any) -> tuple[Any, dict] | None:
        """Restores the newest readable checkpoint into the structure of `target`; None when there is none."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        for step in reversed(self.all_steps()):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                    ),
                )
                return restored["state"], dict(restored["meta"])
            except Exception as err:  # noqa: BLE001 - a truncated or corrupt checkpoint: try the one before
                self.unreadable.add(step)
                reason = (str(err).strip().splitlines() or [""])[0][:200]
                warnings.warn(
                    f"checkpoint step {step} in {self.directory} could not be restored "
                    f"({type(err).__name__}: {reason}); falling back to an older one"
                )
        return None

    def close(self) -> None:
        self.manager.close()
