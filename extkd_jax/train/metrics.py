"""Classification summaries from logits, and a run's metrics: `metrics.jsonl` plus the metric writers.

`metrics.jsonl` holds one JSON object per epoch (the record the report and plots read). The same scalars, and the
per-step values of every `metrics.log_every_steps`-th step (loss, its parts, learning rate), go to the writers of
`metrics.writers` (train/writers.py: JSON lines, TensorBoard, Weights & Biases) at the global step, with the
resolved config as hyperparameters: `tensorboard --logdir <workdir>` shows them against the step.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from extkd_jax.train.workdir import is_remote, write_text_atomic
from extkd_jax.train.writers import MetricWriter, flatten_hparams, make_writers, step_scalars

log = logging.getLogger(__name__)


def classification_summary(
    logits: np.ndarray, labels: np.ndarray, num_classes: int, unseen_classes: Sequence[int] = ()
) -> dict:
    """Accuracy overall, per class, on seen and on unseen (dropped) classes; fractions in [0, 1]."""
    predictions = np.asarray(logits).argmax(-1)
    labels = np.asarray(labels)
    correct = predictions == labels
    per_class = [
        float(correct[labels == c].mean()) if np.any(labels == c) else float("nan") for c in range(num_classes)
    ]
    unseen = np.isin(labels, np.asarray(list(unseen_classes), dtype=labels.dtype))
    out = {"acc": float(correct.mean()) if len(labels) else float("nan"), "per_class_acc": per_class}
    if len(unseen_classes):
        out["seen_acc"] = float(correct[~unseen].mean()) if np.any(~unseen) else float("nan")
        out["unseen_acc"] = float(correct[unseen].mean()) if np.any(unseen) else float("nan")
    return out


def confusion_matrix(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts[true, predicted]."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(logits).argmax(-1)), 1)
    return matrix


def _parse_records(text: str) -> tuple[list[dict], int]:
    """(the epoch records of a metrics.jsonl text, how many lines were not readable records)."""
    records, bad = [], 0
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    return records, bad


def read_metrics(workdir: str | epath.PathLike) -> list[dict]:
    """The epoch records of `workdir/metrics.jsonl`; [] when missing; unreadable lines skipped with a warning."""
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    records, bad = _parse_records(path.read_text())
    if bad:
        log.warning("%s: %d unreadable line(s) skipped (a write cut short?)", path, bad)
    return records


def _scalars(record: dict) -> dict[str, float]:
    """The record's finite numbers, named for TensorBoard (`train/loss`, `test/acc`, `run/epoch`, ...)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            continue
        group, _, rest = key.partition("_")
        if group in ("train", "val", "test") and rest:
            out[f"{group}/{rest}"] = float(value)
        elif key != "step":
            out[f"run/{key}"] = float(value)
    return out


class MetricsConflictError(ValueError):
    """metrics.jsonl and the checkpoint's copy of the records disagree on an epoch both hold."""


class MetricsLog:
    """One JSON object per epoch in `workdir/metrics.jsonl`, and the same scalars in TensorBoard.

    The records are kept in memory (and in each checkpoint's meta, see train/loop.py). Each epoch's record is
    appended to a local file and fsync'ed (O(1) bytes per epoch); the whole file is rewritten atomically instead on
    an object store (gs://, no append) and when the file is not what this log last wrote (deleted or changed
    mid-run). On resume a torn last line, a deleted file or epochs written after the last checkpoint are repaired
    from the checkpoint's copy; a readable record that contradicts the checkpoint's copy stops the run
    (MetricsConflictError) and neither is overwritten. Only process 0 writes.

    The writers (`writers`: names from train/writers.py, or MetricWriter objects such as clu's) get each epoch's
    scalars at its global step, the per-step values of every `log_every_steps`-th step (0: none), and the
    hyperparameters `hparams` (the resolved config, flattened) when they open. They open at the first epoch record
    (or `flush`), so a run refused or stopped before then leaves nothing; per-step values wait in memory until then.
    `settings`: config.metrics (the W&B project, entity and mode)."""

    def __init__(
        self,
        workdir: str | epath.PathLike,
        enabled: bool = True,
        *,
        writers: Sequence[str | MetricWriter] = ("jsonl", "tensorboard"),
        log_every_steps: int = 0,
        hparams: Mapping[str, Any] | None = None,
        settings: Any = None,
    ):
        self.workdir = epath.Path(workdir)
        self.path = self.workdir / "metrics.jsonl"
        self.enabled = enabled
        self.records: list[dict] = []
        self._size = -1  # bytes of the file as this log last wrote it (-1: unknown, rewrite before appending)
        self._writer_specs = tuple(writers)
        self._writers: list[MetricWriter] | None = None  # opened at the first record: a refused run leaves none
        self._log_every = int(log_every_steps)
        self._hparams = flatten_hparams(hparams) if hparams is not None else None
        self._settings = settings
        self._resume_step = 0
        self._pending: list[tuple[int, dict[str, float]]] = []  # per-step scalars waiting for the writers

    def resume(
        self, epoch: int, history: list[dict] | None, checkpoint: str = "the checkpoint", *, step: int = 0
    ) -> None:
        """Starts from the records of epochs <= `epoch`: the checkpoint's copy `history` when it has one (older
        checkpoints do not), else the file's. Rewrites the file when it disagrees, with a warning when records
        were damaged or missing (not for the records of epochs after the checkpoint, which a rerun redoes).
        `checkpoint` names the checkpoint in the error raised when a readable record of the file contradicts it.
        `step`: the checkpoint's global step; what the writers hold past it is dropped when they open."""
        self._resume_step = int(step)
        text = self.path.read_text() if self.path.exists() else ""
        on_disk, bad = _parse_records(text)
        if history is not None:
            _check_agree(self.path, on_disk, history, epoch, checkpoint)
        source = on_disk if history is None else history
        self.records = [r for r in source if r.get("epoch", 0) <= epoch]
        kept = [r for r in on_disk if r.get("epoch", 0) <= epoch]
        if not self.enabled or (_same(on_disk, self.records) and not bad):
            self._size = len(text.encode())
            return
        if bad or not _same(kept, self.records):
            log.warning(
                "%s: %s; rewritten from the checkpoint's copy of the %d epoch record(s)",
                self.path,
                f"{bad} unreadable line(s)" if bad else f"{len(kept)} of {len(self.records)} epoch records present",
                len(self.records),
            )
        self._write_file()

    def write(self, record: dict) -> None:
        """Appends an epoch record to metrics.jsonl, and gives its scalars to the writers at its global step."""
        self.records.append(record)
        if not self.enabled:
            return
        self._append(json.dumps(record) + "\n")
        self._flush_pending()
        step = record.get("step", record.get("epoch", 0))
        for writer in self._writers:
            writer.write_scalars(step, _scalars(record))
            writer.flush()

    def write_steps(self, first_step: int, step_metrics: Mapping[str, np.ndarray]) -> None:
        """Keeps the per-step values of one dispatch (host arrays, one entry per step of steps `first_step`,
        `first_step + 1`, ...) for every step whose global step (updates applied after it) is a multiple of
        `log_every_steps`; they reach the writers at the next `write` or `flush`."""
        if not (self.enabled and self._log_every > 0):
            return
        count = len(np.asarray(step_metrics["loss"]))
        for i in range(count):
            step = first_step + i + 1
            if step % self._log_every == 0:
                self._pending.append((step, step_scalars(step_metrics, i)))

    def flush(self) -> None:
        """Hands the waiting per-step values to the writers and flushes them (before a preemption checkpoint)."""
        if self.enabled and (self._pending or self._writers is not None):
            self._flush_pending()
            for writer in self._writers:
                writer.flush()

    def _flush_pending(self) -> None:
        if self._writers is None:
            self._writers = self._open_writers()
        for step, scalars in self._pending:
            for writer in self._writers:
                writer.write_scalars(step, scalars)
        self._pending = []

    def _open_writers(self) -> list[MetricWriter]:
        names = [w for w in self._writer_specs if isinstance(w, str)]
        writers = [w for w in self._writer_specs if not isinstance(w, str)]
        opened = make_writers(names, self.workdir, self._resume_step, self._settings).writers + writers
        if self._hparams is not None:
            for writer in opened:
                writer.write_hparams(self._hparams)
        return opened

    def _append(self, line: str) -> None:
        """Appends `line` locally (fsync'ed) when the file is as this log left it; else rewrites the whole file."""
        local = os.fspath(self.path)
        if is_remote(self.path) or self._size <= 0 or not os.path.isfile(local) or os.path.getsize(local) != self._size:
            self._write_file()
            return
        data = line.encode()
        with open(local, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self._size += len(data)

    def _write_file(self) -> None:
        # the whole file, atomically, through epath: object stores (gs://) have no append
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        write_text_atomic(self.path, text)
        self._size = len(text.encode())

    def close(self) -> None:
        self.flush()
        for writer in self._writers or []:
            writer.close()
        self._writers = None


def _check_agree(path: epath.Path, on_disk: list[dict], history: list[dict], epoch: int, checkpoint: str) -> None:
    """Raises MetricsConflictError when a readable record of the file differs from the checkpoint's record of the
    same epoch (one of them was changed after it was written: neither is trusted over the other)."""
    by_epoch = {r.get("epoch"): r for r in history}
    for record in on_disk:
        theirs = by_epoch.get(record.get("epoch"))
        if record.get("epoch", 0) > epoch or theirs is None or _same([record], [theirs]):
            continue
        keys = sorted(k for k in set(record) | set(theirs) if json.dumps(record.get(k)) != json.dumps(theirs.get(k)))
        shown = ", ".join(f"{k}: {record.get(k)!r} in the file, {theirs.get(k)!r} in the checkpoint" for k in keys[:4])
        raise MetricsConflictError(
            f"{path} and {checkpoint} disagree on epoch {record.get('epoch')} ({shown}): one was changed after it "
            "was written. Neither is overwritten: restore the right metrics.jsonl (or delete it to have it rewritten "
            "from the checkpoint), or use another --workdir"
        )


def _same(a: list[dict], b: list[dict]) -> bool:
    """Record lists equal as JSON (NaN equals NaN)."""
    return json.dumps(a) == json.dumps(b)
