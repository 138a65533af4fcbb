"""Classification summaries from logits, and a run's metrics: `metrics.jsonl` plus TensorBoard event files.

`metrics.jsonl` holds one JSON object per epoch (the record the report and plots read); the same scalars go to
`<workdir>/tensorboard/` as TensorBoard events, written with the `tensorboard` package's own writer (no
TensorFlow needed): `tensorboard --logdir <workdir>` shows them. For a remote workdir (gs://) the event file is
written locally and copied up after each epoch.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence

import numpy as np
from etils import epath

from extkd_jax.train.workdir import is_remote, write_text_atomic

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
    """The record's finite numbers, named for TensorBoard (`train/loss`, `test/acc`, ...)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            continue
        group, _, rest = key.partition("_")
        if group in ("train", "val", "test") and rest:
            out[f"{group}/{rest}"] = float(value)
        elif key not in ("epoch", "step"):
            out[f"run/{key}"] = float(value)
    return out


class TensorBoardLog:
    """Scalars as TensorBoard events in `logdir` (local or remote), via tensorboard's event writer."""

    def __init__(self, logdir: epath.Path):
        from tensorboard.compat.proto import event_pb2, summary_pb2  # lazy: the [train] extra
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        self.logdir = logdir
        self._remote = "://" in str(logdir)
        local = tempfile.mkdtemp(prefix="extkd_tb_") if self._remote else str(logdir)
        os.makedirs(local, exist_ok=True)
        self._writer = EventFileWriter(local)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        summary = self._summary_pb2.Summary(
            value=[self._summary_pb2.Summary.Value(tag=tag, simple_value=value) for tag, value in scalars.items()]
        )
        self._writer.add_event(self._event_pb2.Event(step=int(step), wall_time=time.time(), summary=summary))
        self._writer.flush()
        if self._remote:  # event files are append-only: copy the whole file up
            local = epath.Path(self._writer.get_logdir())
            self.logdir.mkdir(parents=True, exist_ok=True)
            for path in local.iterdir():
                (self.logdir / path.name).write_bytes(path.read_bytes())

    def close(self) -> None:
        self._writer.close()


class MetricsConflictError(ValueError):
    """metrics.jsonl and the checkpoint's copy of the records disagree on an epoch both hold."""


class MetricsLog:
    """One JSON object per epoch in `workdir/metrics.jsonl`, and the same scalars in TensorBoard.

    The records are kept in memory (and in each checkpoint's meta, see train/loop.py). Each epoch's record is
    appended to a local file and fsync'ed (O(1) bytes per epoch); the whole file is rewritten atomically instead on
    an object store (gs://, no append) and when the file is not what this log last wrote (deleted or changed
    mid-run). On resume a torn last line, a deleted file or epochs written after the last checkpoint are repaired
    from the checkpoint's copy; a readable record that contradicts the checkpoint's copy stops the run
    (MetricsConflictError) and neither is overwritten. Only process 0 writes; TensorBoard is skipped with a warning
    when the `tensorboard` package is missing."""

    def __init__(self, workdir: str | epath.PathLike, enabled: bool = True):
        self.workdir = epath.Path(workdir)
        self.path = self.workdir / "metrics.jsonl"
        self.enabled = enabled
        self.records: list[dict] = []
        self._size = -1  # bytes of the file as this log last wrote it (-1: unknown, rewrite before appending)
        self._tensorboard: TensorBoardLog | None = None  # made at the first record: a refused run leaves none
        self._tensorboard_missing = False

    def resume(self, epoch: int, history: list[dict] | None, checkpoint: str = "the checkpoint") -> None:
        """Starts from the records of epochs <= `epoch`: the checkpoint's copy `history` when it has one (older
        checkpoints do not), else the file's. Rewrites the file when it disagrees, with a warning when records
        were damaged or missing (not for the records of epochs after the checkpoint, which a rerun redoes).
        `checkpoint` names the checkpoint in the error raised when a readable record of the file contradicts it."""
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
        self.records.append(record)
        if not self.enabled:
            return
        self._append(json.dumps(record) + "\n")
        if self._tensorboard is None and not self._tensorboard_missing:
            try:
                self._tensorboard = TensorBoardLog(self.workdir / "tensorboard")
            except ImportError:
                log.warning(
                    "tensorboard is not installed: metrics go to metrics.jsonl only (pip install 'extkd_jax[train]')"
                )
                self._tensorboard_missing = True
        if self._tensorboard is not None:
            self._tensorboard.write(record.get("epoch", 0), _scalars(record))

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
        if self._tensorboard is not None:
            self._tensorboard.close()


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
