"""Tests and multiplicity control for the experiment's paired comparisons.

One comparison per experiment is primary, declared in the config (`reproduce.primary`) before any run: its own
two-sided p at 0.05 carries its verdict. Every other comparison is exploratory: its verdict uses the Holm-adjusted
p within the experiment's family of exploratory comparisons (family-wise error 0.05); Benjamini-Hochberg q-values
(false discovery rate) are reported beside it. With fewer than `MIN_SEEDS` paired values no verdict is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as scipy_stats

ALPHA = 0.05
MIN_SEEDS = 3  # fewer paired values: the interval is shown, no verdict is drawn


def paired_t_p(mean: float, std: float | None, n: int) -> float | None:
    """Two-sided p of the paired t test of mean difference 0 from n differences with sample std `std`
    (None when n < 2); an exact 0 spread gives p 0 for a non-zero mean and 1 for a zero one."""
    if n < 2 or std is None or not math.isfinite(mean):
        return None
    if std == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    t = mean / (std / math.sqrt(n))
    return float(2.0 * scipy_stats.t.sf(abs(t), n - 1))


def holm(ps: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the order given."""
    p = np.asarray(ps, np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def benjamini_hochberg(ps: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg q-values (false discovery rate), in the order given."""
    p = np.asarray(ps, np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    q = np.empty(m)
    running = 1.0
    for rank in range(m - 1, -1, -1):
        i = order[rank]
        running = min(running, p[i] * m / (rank + 1))
        q[i] = running
    return q.tolist()


def adjust(comparisons: list, primary: Sequence[str] = ()) -> None:
    """Marks the comparison `primary` = (method, baseline) on the dropped classes after correction, and sets each
    comparison's `p_holm` and `q_bh`: the primary's are its own p (a family of one), the others' are adjusted within
    the exploratory family. Comparisons without a p (n < 2) keep None and are not counted in the family."""
    for c in comparisons:
        c.primary = bool(primary) and (c.method, c.baseline) == tuple(primary) and c.metric == PRIMARY_METRIC
        if c.primary:
            c.p_holm = c.q_bh = c.p
    family = [c for c in comparisons if not c.primary and c.p is not None]
    for c, h, q in zip(family, holm([c.p for c in family]), benjamini_hochberg([c.p for c in family]), strict=True):
        c.p_holm, c.q_bh = h, q
    for c in comparisons:
        if not c.primary and c.p is None:
            c.p_holm = c.q_bh = None


PRIMARY_METRIC = "unseen_acc_corrected"


def decision_p(c) -> float | None:
    """The p a comparison's verdict reads: its own for the primary, Holm's for the others."""
    return c.p if c.primary else c.p_holm


def verdict_word(c) -> str:
    """'n < 3: no verdict', 'difference detected' or 'no difference detected', from the adjusted figures."""
    if c.n < MIN_SEEDS or decision_p(c) is None:
        return f"n < {MIN_SEEDS}: no verdict"
    return "difference detected" if decision_p(c) < ALPHA else "no difference detected"
