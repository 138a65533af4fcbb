"""Classification summaries from logits, and the JSON-lines metrics log."""

from __future__ import annotations

import json
import pathlib
from typing import Sequence

import numpy as np


def classification_summary(
    logits: np.ndarray, labels: np.ndarray, num_classes: int, unseen_classes: Sequence[int] = ()
) -> dict:
    """Accuracy overall, per class, on seen and on unseen (dropped) classes; fractions in [0, 1]."""
    predictions = np.asarray(logits).argmax(-1)
    labels = np.asarray(labels)
    correct = predictions == labels
    per_class = [
        float(correct[labels == c].mean()) if np.any(labels == c) else float("nan")
        for c in range(num_classes)
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


class MetricsLog:
    """Appends one JSON object per line to `workdir/metrics.jsonl` (process 0 only)."""

    def __init__(self, workdir: str | pathlib.Path, enabled: bool = True):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.enabled = enabled

    def truncate_after(self, epoch: int) -> None:
        """Drops records of epochs after `epoch`: a resumed run rewrites them."""
        if not (self.enabled and self.path.exists()):
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("epoch", 0) <= epoch
        ]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
