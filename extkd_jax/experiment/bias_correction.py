"""Correcting a student's bias against classes it never saw, without their labels.

A student distilled without any example of some classes under-predicts them. Hinton et al. (2015) raised the
omitted digit's logit by one scalar. We choose the shifts on unlabelled images only: one shift per dropped class,
so that the student predicts each dropped class as often as the teacher does (`shifts_to_match_teacher`,
coordinate search: each class's predicted fraction grows monotonically with its own shift, so bisection finds it
with the others held, and a few sweeps settle the joint solution). `shared` gives one scalar for all of them.

`shift_maximizing_accuracy` uses labels of the dropped classes: an oracle, reported apart, never in headlines.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BOUND = 200.0  # logit shifts searched in [-BOUND, BOUND]; far beyond any trained model's logit range
BISECTION_STEPS = 60
SWEEPS = 20


def shift_logits(logits: np.ndarray, classes: Sequence[int], shifts: float | Sequence[float]) -> np.ndarray:
    """Adds `shifts` (one per class, or one for all) to the logits of `classes`; logits (N, C)."""
    out = np.array(logits, dtype=np.float64, copy=True)
    out[:, list(classes)] += np.asarray(shifts, np.float64)
    return out


def predicted_fractions(logits: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Fraction of examples whose arg-max is each of `classes`."""
    if len(logits) == 0:
        return np.zeros(len(classes))
    predictions = np.asarray(logits).argmax(-1)
    return np.array([(predictions == c).mean() for c in classes])


def _bisect(fraction_of, target: float) -> float:
    """The shift in [-BOUND, BOUND] whose predicted fraction is closest to `target` (fraction_of increasing)."""
    lo, hi = -BOUND, BOUND
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if fraction_of(mid) < target:
            lo = mid
        else:
            hi = mid
    return min((lo, hi), key=lambda b: abs(fraction_of(b) - target))


def shifts_to_match_teacher(
    student_logits: np.ndarray,
    teacher_logits: np.ndarray,
    classes: Sequence[int],
    shared: bool = False,
) -> list[float]:
    """Per-class shifts (or one shared shift, repeated) that make the student predict each of `classes` as often
    as the teacher does on the same unlabelled images."""
    classes = list(classes)
    if not classes or len(student_logits) == 0:
        return [0.0] * len(classes)
    targets = predicted_fractions(teacher_logits, classes)
    if shared:
        total = float(targets.sum())
        shift = _bisect(lambda b: predicted_fractions(shift_logits(student_logits, classes, b), classes).sum(), total)
        return [float(shift)] * len(classes)
    shifts = np.zeros(len(classes))
    for _ in range(SWEEPS):
        before = shifts.copy()
        for j in range(len(classes)):

            def fraction_of(b, j=j):
                trial = shifts.copy()
                trial[j] = b
                return predicted_fractions(shift_logits(student_logits, classes, trial), classes)[j]

            shifts[j] = _bisect(fraction_of, targets[j])
        if np.max(np.abs(shifts - before)) < 1e-6:
            break
    return [float(s) for s in shifts]


def shift_maximizing_accuracy(
    logits: np.ndarray, labels: np.ndarray, classes: Sequence[int], grid: np.ndarray | None = None
) -> float:
    """Oracle: the shared shift (on a grid) with the best accuracy on labelled data; ties go to the smallest |shift|."""
    if not len(classes) or len(logits) == 0:
        return 0.0
    grid = np.linspace(-20.0, 40.0, 601) if grid is None else np.asarray(grid)
    grid = grid[np.argsort(np.abs(grid), kind="stable")]
    scores = [float((shift_logits(logits, classes, b).argmax(-1) == labels).mean()) for b in grid]
    return float(grid[int(np.argmax(scores))])
