"""Orbax checkpoints of a workdir: every item a resumed run or a loader needs, one restore path for both.

Items of each checkpoint step:
  state  the TrainState (params, BatchNorm statistics, optimizer state): what a resumed run restores;
  model  the trained model's own variables ({"params", "batch_stats"}): what `extkd_jax.load` restores;
  card   JSON: what using the model needs (architecture, classes, input shape, normalisation, dtype);
  meta   JSON: where the run stands (epoch, partial sums of a preempted epoch);
  data   JSON: the stream pipeline's iterator state (empty for the device-resident pipeline);
  digest JSON: a SHA-256 of each array item as saved (Orbax keeps no checksums of its own).

Orbax writes each step into a temporary directory and renames it when complete, so a checkpoint is never
half-written. `restore_latest` tries the newest step first and falls back to older ones, with a warning, when a
step cannot be read or its arrays do not match their digest (a flipped byte on disk); a later save of that step
replaces the unreadable one. Paths go through `etils.epath`, so a
`gs://` workdir works like a local one.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

JSON_ITEMS = ("card", "meta", "data", "digest")


class ChecksumError(ValueError):
    """A checkpoint's arrays differ from the digest written with them."""


def tree_digest(tree: Any) -> str | None:
    """SHA-256 over a pytree's leaves (key path, dtype, shape and bytes of each), or None when an array is not
    fully addressable from this process (a multi-host sharded array: not verified)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return None
        array = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def checkpoint_dir(workdir: str | epath.PathLike) -> epath.Path:
    path = epath.Path(workdir)
    return (path if path.is_absolute() or str(path).startswith(("gs://", "s3://")) else path.absolute()) / "checkpoints"


def _save_args(items: dict[str, Any]) -> ocp.args.Composite:
    return ocp.args.Composite(
        **{k: ocp.args.JsonSave(v) if k in JSON_ITEMS else ocp.args.StandardSave(v) for k, v in items.items()}
    )


def _restore_args(targets: dict[str, Any]) -> ocp.args.Composite:
    """`targets`: item -> a pytree of arrays or abstract arrays (shapes and dtypes), or None for JSON items."""
    return ocp.args.Composite(
        **{
            k: ocp.args.JsonRestore()
            if k in JSON_ITEMS
            else ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, v))
            for k, v in targets.items()
        }
    )


class Checkpointer:
    """Saves and restores checkpoint items (see the module docstring) under `workdir/checkpoints`."""

    def __init__(self, workdir: str | epath.PathLike, keep: int = 2, create: bool = True):
        self.directory = checkpoint_dir(workdir)
        # cleanup_tmp_directories: a `<step>.orbax-checkpoint-tmp-*` directory left by a run killed mid-save is
        # deleted when the next run starts (one trainer per workdir, so no save of another run is in flight)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=create, enable_async_checkpointing=False, cleanup_tmp_directories=create
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.unreadable: set[int] = set()  # steps restore_latest could not read: save() replaces them

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, items: dict[str, Any]) -> None:
        """Writes `items` as step `step` (a no-op if that step exists and is readable)."""
        if step in self.manager.all_steps():
            if step not in self.unreadable:
                return
            log.warning("replacing the unreadable checkpoint step %d in %s", step, self.directory)
            self.manager.delete(step)
            self.unreadable.discard(step)
        digest = {k: tree_digest(v) for k, v in items.items() if k not in JSON_ITEMS}
        self.manager.save(step, args=_save_args({**items, "digest": digest}), force=True)
        self.manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        """Whether the runtime signalled a preemption (Orbax's own detection, agreed on by every process)."""
        return bool(self.manager.reached_preemption(step))

    def restore_latest(self, targets: dict[str, Any], optional: tuple[str, ...] = ()) -> tuple[int, dict] | None:
        """(step, {item: value}) of the newest step that restores into `targets`; None when there is none. Items in
        `optional` that a step lacks (written by an older version) come back as None."""
        for step in reversed(self.all_steps()):
            present = {
                k: v for k, v in targets.items() if k not in optional or (self.directory / str(step) / k).exists()
            }
            has_digest = (self.directory / str(step) / "digest").exists()
            try:
                restored = self.manager.restore(
                    step, args=_restore_args({**present, **({"digest": None} if has_digest else {})})
                )
                if has_digest:
                    _verify(restored, present, step)
                return step, {k: restored[k] if k in present else None for k in targets}
            except Exception as err:  # noqa: BLE001 - a truncated or corrupt checkpoint: try the one before
                self.unreadable.add(step)
                reason = (str(err).strip().splitlines() or [""])[0][:200]
                warnings.warn(
                    f"checkpoint step {step} in {self.directory} could not be restored "
                    f"({type(err).__name__}: {reason}); falling back to an older one",
                    stacklevel=2,
                )
        return None

    def close(self) -> None:
        self.manager.close()


def _verify(restored, present: dict[str, Any], step: int) -> None:
    """Raises ChecksumError when a restored array item does not hash to its stored digest."""
    stored = restored["digest"] or {}
    for item in present:
        if item in JSON_ITEMS or stored.get(item) is None:
            continue
        actual = tree_digest(restored[item])
        if actual is not None and actual != stored[item]:
            raise ChecksumError(f"the arrays of item {item!r} of step {step} do not match their SHA-256 digest")
