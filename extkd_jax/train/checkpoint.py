"""Orbax checkpoints of a workdir: every item a resumed run or a loader needs, one restore path for both.

Items of each checkpoint step:
  state  the TrainState (params, BatchNorm statistics, optimizer state): what a resumed run restores;
  model  the trained model's own variables ({"params", "batch_stats"}): what `extkd_jax.load` restores;
  card   JSON: what using the model needs (architecture, classes, input shape, pixel convention, normalisation,
         dtype);
  meta   JSON: where the run stands (epoch, partial sums of a preempted epoch);
  data   JSON: the stream pipeline's iterator state (empty for the device-resident pipeline);
  digest JSON: a SHA-256 of every other item as saved (Orbax keeps no checksums of its own): of each array item's
         leaves, and of each JSON item's canonical text (sorted keys, no spaces), with the checkpoint format.

Orbax writes each step into a temporary directory and renames it when complete, so a checkpoint is never
half-written. `restore_latest` tries the newest step first and falls back to older ones, with a warning, when a
step cannot be read, an item does not match its digest (a flipped byte on disk, an edited card or meta), or the
digest is missing from a step whose format writes one (`FORMAT`, also in the step's Orbax metadata); a step of an
older version without a digest is restored with a warning that it is unverified. A later save of an unreadable step
replaces it. A step deleted while it was being read (by the trainer keeping `keep` steps) is skipped without a
warning and recorded in `failures`. Paths go through `etils.epath`, so a `gs://` workdir works like a local one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

JSON_ITEMS = ("card", "meta", "data", "digest")
# 2: the digest covers the JSON items too and records this number; 1 (no number): array digests only, or none
FORMAT = 2
FORMAT_KEY = "extkd_checkpoint_format"  # in the digest item and in the step's Orbax custom metadata
DELETED = "deleted while it was being read"  # a failure reason: not damage, list the steps again
_DELETION_WAIT_S = 0.3  # a step whose read failed is looked at again after this long: a deletion may be under way


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


def json_digest(value: Any) -> str:
    """SHA-256 of a JSON item's canonical text (as Orbax writes it, then parsed: tuples are lists, keys strings)."""
    canonical = json.dumps(json.loads(json.dumps(value)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


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
        self.failures: dict[int, str] = {}  # step -> why the last restore_latest did not use it

    def all_steps(self, read: bool = False) -> list[int]:
        """The steps on disk; `read=True` lists them again (another process may have written or deleted some)."""
        if read and hasattr(self.manager, "reload"):  # orbax's spelling since `all_steps(read=True)` was deprecated
            self.manager.reload()
            read = False
        return sorted(self.manager.all_steps(read=read))

    def save(self, step: int, items: dict[str, Any]) -> None:
        """Writes `items` as step `step` (a no-op if that step exists and is readable)."""
        if step in self.manager.all_steps():
            if step not in self.unreadable:
                return
            log.warning("replacing the unreadable checkpoint step %d in %s", step, self.directory)
            self.manager.delete(step)
            self.unreadable.discard(step)
        digest = {k: json_digest(v) if k in JSON_ITEMS else tree_digest(v) for k, v in items.items()}
        self.manager.save(
            step,
            args=_save_args({**items, "digest": {**digest, FORMAT_KEY: FORMAT}}),
            force=True,
            custom_metadata={FORMAT_KEY: FORMAT},
        )
        self.manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        """Whether the runtime signalled a preemption (Orbax's own detection, agreed on by every process)."""
        return bool(self.manager.reached_preemption(step))

    def restore_latest(
        self, targets: dict[str, Any], optional: tuple[str, ...] = (), steps: list[int] | None = None
    ) -> tuple[int, dict] | None:
        """(step, {item: value}) of the newest step (of `steps`, default all) that restores into `targets` and
        matches its digest; None when there is none (`failures` then says why for each step). Items in `optional`
        that a step lacks (written by an older version) come back as None."""
        self.failures = {}
        for step in sorted(self.all_steps() if steps is None else steps, reverse=True):
            step_dir = self.directory / str(step)
            present = {k: v for k, v in targets.items() if k not in optional or (step_dir / k).exists()}
            try:
                if not step_dir.exists():
                    raise FileNotFoundError(step_dir)
                has_digest = (step_dir / "digest").exists()
                if not has_digest:
                    self._check_undigested(step)
                for item, target in present.items():
                    if item not in JSON_ITEMS and target is not None:
                        _check_stored_shapes(step_dir / item, target)
                restored = self.manager.restore(
                    step, args=_restore_args({**present, **({"digest": None} if has_digest else {})})
                )
                if has_digest:
                    _verify(restored, present, step)
                return step, {k: restored[k] if k in present else None for k in targets}
            except Exception as err:  # noqa: BLE001 - a truncated or corrupt checkpoint: try the one before
                if _deleted(step_dir):  # by a trainer writing this workdir (it keeps `keep` steps): not damage
                    self.failures[step] = DELETED
                    continue
                self.unreadable.add(step)
                reason = (str(err).strip().splitlines() or [""])[0][:200]
                self.failures[step] = f"{type(err).__name__}: {reason}"
                warnings.warn(
                    f"checkpoint step {step} in {self.directory} could not be restored "
                    f"({self.failures[step]}); falling back to an older one",
                    stacklevel=2,
                )
        return None

    def describe_failures(self) -> str:
        """The last `restore_latest`'s reasons, newest step first: "step 21: ...; step 14: ..."."""
        return "; ".join(f"step {step}: {reason}" for step, reason in sorted(self.failures.items(), reverse=True))

    def _check_undigested(self, step: int) -> None:
        """A step without its digest: refused (ChecksumError) when its format writes one, else a warning."""
        try:
            record = json.loads((self.directory / str(step) / "_CHECKPOINT_METADATA").read_text())
            written = int((record.get("custom_metadata") or {}).get(FORMAT_KEY, 1))
        except (OSError, ValueError, TypeError, AttributeError):
            written = 1
        if written >= 2:
            raise ChecksumError(
                f"step {step} has no `digest` item, though its format ({written}) writes one: it cannot be verified"
            )
        warnings.warn(
            f"checkpoint step {step} in {self.directory} has no digest (written by an older version): "
            "restored without verification",
            stacklevel=3,
        )

    def close(self) -> None:
        self.manager.close()


def _deleted(step_dir: epath.Path) -> bool:
    """Whether a step whose read failed is gone, or going (a deletion in progress finishes within a moment)."""
    if not step_dir.exists():
        return True
    time.sleep(_DELETION_WAIT_S)
    return not step_dir.exists()


def _key_names(path: tuple) -> tuple[str, ...]:
    """A key path as plain names, whichever pytree node (dict, attribute, sequence) each step went through."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _check_stored_shapes(item_dir: epath.Path, target: Any) -> None:
    """Raises ValueError when an array of `target` has another shape than the same-named array stored in
    `item_dir`, before any array is read: Orbax's own check fails midway through its concurrent reads, whose
    abandoned coroutines then warn "Event loop is closed" at exit. Arrays only one side has are left to Orbax."""
    stored_tree = ocp.StandardCheckpointHandler().metadata(item_dir)
    stored = {
        _key_names(path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(stored_tree)[0]
        if getattr(leaf, "shape", None) is not None
    }
    for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
        name, wanted = _key_names(path), tuple(np.shape(leaf))
        if name in stored and stored[name] != wanted:
            raise ValueError(
                f"the requested shape {wanted} of {'.'.join(name)} is not compatible with the stored shape "
                f"{stored[name]} in {item_dir}"
            )


def _verify(restored, present: dict[str, Any], step: int) -> None:
    """Raises ChecksumError when a restored item does not hash to its stored digest (or, from format 2 on, has
    none). A None digest is an array not addressable from one process (multi-host): not verified."""
    stored = restored["digest"] or {}
    written = stored.get(FORMAT_KEY, 1)
    for item in present:
        if item not in stored:
            if written >= 2:
                raise ChecksumError(f"item {item!r} of step {step} has no entry in the step's digest")
            continue  # format 1: array digests only
        if stored[item] is None:
            continue
        actual = json_digest(restored[item]) if item in JSON_ITEMS else tree_digest(restored[item])
        if actual is not None and actual != stored[item]:
            kind = "JSON text" if item in JSON_ITEMS else "arrays"
            raise ChecksumError(
                f"the {kind} of item {item!r} of step {step} do not match their SHA-256 digest "
                "(damaged or edited after it was written)"
            )
