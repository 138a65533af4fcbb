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

from extkd_jax.train.workdir import write_text_atomic

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


def read_metrics(workdir: str | epath.PathLike) -> list[dict]:
    """The epoch records of `workdir/metrics.jsonl`; [] when missing; unreadable lines skipped."""
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
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


class MetricsLog:
    """Appends one JSON object per epoch to `workdir/metrics.jsonl` and the same scalars to TensorBoard
    (process 0 only; TensorBoard is skipped with a warning when the `tensorboard` package is missing)."""

    def __init__(self, workdir: str | epath.PathLike, enabled: bool = True):
        self.workdir = epath.Path(workdir)
        self.path = self.workdir / "metrics.jsonl"
        self.enabled = enabled
        self._tensorboard: TensorBoardLog | None = None  # made at the first record: a refused run leaves none
        self._tensorboard_missing = False

    def truncate_after(self, epoch: int) -> None:
        """Drops records of epochs after `epoch`: a resumed run rewrites them."""
        if not (self.enabled and self.path.exists()):
            return
        kept = [r for r in read_metrics(self.workdir) if r.get("epoch", 0) <= epoch]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        # read-modify-write through epath: object stores (gs://) have no append
        previous = self.path.read_text() if self.path.exists() else ""
        write_text_atomic(self.path, previous + json.dumps(record) + "\n")
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

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
