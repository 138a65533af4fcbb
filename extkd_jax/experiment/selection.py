"""Choosing a method's knob blind to the dropped classes, by construction.

The validation carve-out is split at random (`data.splits.selection_indices`) into

- a *labelled* set: seen-class images only, as the transfer set is built (a held-out part of it), and
- an unlabelled *pool* of every class, disjoint from it, whose labels are never read.

The correction shift is fitted on the pool (the student then predicts each dropped class as often as its teacher
does there), and the criterion is the corrected accuracy on the labelled set. It is a function of (the labelled
set's logits, their labels, the pool's logits) and of the teacher's pool logits, which every student of a teacher
shares: a dropped-class image enters only as an unlabelled pool image, and two students with the same logits on the
labelled set and on the pool score the same, whatever the pool images are.

Before (the issue "Verdicts you can defend"), the shift was fitted on every validation image and the criterion read
the seen-class subset of the same images: with the number of dropped-class predictions fixed by the teacher, each
dropped-class image a student recognised freed one seen-class image, so the criterion rewarded it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from extkd_jax.data.splits import selection_indices
from extkd_jax.experiment import bias_correction as bc
from extkd_jax.experiment.runs import grid_of, uses_kd_temperature

SELECTION_KEYS = ("labelled_size", "pool_size", "overlap", "dropped_in_labelled")  # results.json's `selection`


@dataclasses.dataclass(frozen=True, eq=False)
class SelectionPlan:
    """Positions in the validation carve-out: the labelled seen-class set and the unlabelled pool."""

    labelled: np.ndarray
    pool: np.ndarray
    labelled_labels: np.ndarray  # the labels of `labelled` only: the pool's are not kept
    drop_classes: tuple[int, ...]

    @classmethod
    def of(
        cls, val_labels: np.ndarray, num_classes: int, drop_classes: Sequence[int], labelled_fraction: float, seed: int
    ) -> SelectionPlan:
        labelled, pool = selection_indices(val_labels, num_classes, drop_classes, labelled_fraction, seed)
        return cls(labelled, pool, np.asarray(val_labels)[labelled], tuple(int(c) for c in drop_classes))

    def summary(self) -> dict:
        """What results.json records: sizes, and the overlap and dropped-class count computed from the index sets."""
        return {
            "labelled_size": int(len(self.labelled)),
            "pool_size": int(len(self.pool)),
            "overlap": int(len(np.intersect1d(self.labelled, self.pool))),
            "dropped_in_labelled": int(np.isin(self.labelled_labels, list(self.drop_classes)).sum()),
        }


def criterion(
    labelled_logits: np.ndarray,
    labelled_labels: np.ndarray,
    pool_logits: np.ndarray,
    teacher_pool_logits: np.ndarray,
    classes: Sequence[int],
    shared: bool = False,
) -> float:
    """Accuracy on the labelled (seen-class) images after the shift that makes the student predict each of
    `classes` on the unlabelled pool as often as the teacher does there; NaN without labelled images."""
    if not len(labelled_logits):
        return float("nan")
    shifts = bc.shifts_to_match_teacher(pool_logits, teacher_pool_logits, list(classes), shared)
    corrected = bc.shift_logits(labelled_logits, list(classes), shifts)
    return float((corrected.argmax(-1) == np.asarray(labelled_labels)).mean())


def criterion_of_plan(
    plan: SelectionPlan, val_logits: np.ndarray, teacher_val_logits: np.ndarray, shared: bool = False
) -> float:
    """`criterion` of a student's and its teacher's logits on the whole validation carve-out, split by `plan`."""
    return criterion(
        val_logits[plan.labelled],
        plan.labelled_labels,
        val_logits[plan.pool],
        teacher_val_logits[plan.pool],
        plan.drop_classes,
        shared,
    )


def choose(grid: list, default: float) -> tuple[float, list[float]]:
    """(chosen value, values tied with it); a tie goes to the value nearest the configured one."""
    best = max(p.run.val_seen_acc_corrected for p in grid)
    tied = [p.value for p in grid if p.run.val_seen_acc_corrected == best]
    chosen = min(tied, key=lambda v: (abs(v - default), v))
    return chosen, (tied if len(tied) > 1 else [])


KD_TEMPERATURE_REASON = (
    "every distilling objective has KD's KL at loss.temperature; KD's grid tunes it, so the methods that tune another "
    "knob run at KD's choice rather than at the preset's (equal opportunity at the cost of one grid; a 2-D grid for "
    "every method would multiply the selection runs)"
)


def kd_temperature(config, methods: tuple[str, ...], select) -> dict:
    """The temperature of the methods that `uses_kd_temperature`: KD's choice on its grid (its selection runs first,
    trained even when kd is not reported), its one value where the grid has one (so that no method runs at another
    temperature than KD), else the configured one; {} when no such method runs."""
    users = [m for m in methods if uses_kd_temperature(m)]
    if not users:
        return {}
    grid = grid_of(config, "kd")  # (loss.temperature,) where none is configured
    value, source = float(grid[0]), "KD's grid has one value, the one KD runs at"
    if len(grid) > 1:
        points, _ = select("kd", None)
        if points:
            value, source = choose(points, float(config.loss.temperature))[0], "chosen for KD on its grid"
        else:
            value, source = float(config.loss.temperature), "the configured temperature: every KD grid value diverged"
    return {"value": value, "source": source, "methods": users, "reason": KD_TEMPERATURE_REASON}
