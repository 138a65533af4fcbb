"""Label-free (or validation-based) correction of the bias against classes a student never saw.

A student distilled without any example of some classes under-predicts them. Hinton et al. (2015) raised the
omitted digit's logit by one scalar; we choose that scalar without test labels, in one of two ways:

- `teacher_frequency`: on unlabeled images, the shift that makes the student predict the unseen classes as often
  as the teacher does (the predicted fraction grows monotonically with the shift, so bisection finds it);
- `validation`: the shift that maximises accuracy on the labeled held-out validation split.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

BIAS_CORRECTIONS = ("teacher_frequency", "validation")


def shift_logits(logits: np.ndarray, classes: Sequence[int], shift: float) -> np.ndarray:
    """Adds `shift` to the logits of `classes`; logits (N, C)."""
    out = np.array(logits, dtype=np.float64, copy=True)
    out[:, list(classes)] += shift
    return out


def predicted_fraction(logits: np.ndarray, classes: Sequence[int]) -> float:
    """Fraction of examples whose arg-max is one of `classes`."""
    if len(logits) == 0:
        return 0.0
    return float(np.isin(np.asarray(logits).argmax(-1), list(classes)).mean())


def shift_to_match_frequency(
    student_logits: np.ndarray,
    target_fraction: float,
    classes: Sequence[int],
    bound: float = 200.0,
    iterations: int = 60,
) -> float:
    """The shift whose predicted fraction of `classes` is closest to `target_fraction` (bisection)."""
    if not classes or len(student_logits) == 0:
        return 0.0
    lo, hi = -bound, bound
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if predicted_fraction(shift_logits(student_logits, classes, mid), classes) < target_fraction:
            lo = mid
        else:
            hi = mid
    candidates = (lo, hi)
    errors = [
        abs(predicted_fraction(shift_logits(student_logits, classes, b), classes) - target_fraction)
        for b in candidates
    ]
    return float(candidates[int(np.argmin(errors))])


def shift_maximizing_accuracy(
    logits: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[int],
    grid: np.ndarray | None = None,
) -> float:
    """The shift (on a grid) with the best accuracy on labeled held-out data; ties go to the smallest |shift|."""
    if not classes or len(logits) == 0:
        return 0.0
    grid = np.linspace(-20.0, 40.0, 601) if grid is None else np.asarray(grid)
    grid = grid[np.argsort(np.abs(grid), kind="stable")]
    scores = [float((shift_logits(logits, classes, b).argmax(-1) == labels).mean()) for b in grid]
    return float(grid[int(np.argmax(scores))])
