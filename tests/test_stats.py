"""experiment/stats.py: the paired t p against scipy's test, Holm and Benjamini-Hochberg against their definitions
computed another way, and the family: one primary judged at its own p, the others adjusted together."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats as scipy_stats

from extkd_jax.experiment import stats
from extkd_jax.experiment.results import Comparison, MethodResult, RunResult, compare_all, primary_per_teacher


def test_paired_t_p_is_scipys_paired_test():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 12):
        a, b = rng.normal(size=n), rng.normal(size=n) + 0.3
        d = a - b
        p = stats.paired_t_p(float(d.mean()), float(d.std(ddof=1)), n)
        assert p == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue, rel=1e-10)
    # the 97.5% quantile of t with 4 degrees of freedom (2.776) is p = 0.05 two-sided
    assert stats.paired_t_p(2.776, np.sqrt(5), 5) == pytest.approx(0.05, abs=5e-5)  # 2.776 is rounded
    assert stats.paired_t_p(0.1, None, 1) is None and stats.paired_t_p(0.1, 0.2, 1) is None
    assert stats.paired_t_p(0.0, 0.0, 3) == 1.0 and stats.paired_t_p(0.01, 0.0, 3) == 0.0


def _holm_by_definition(ps):
    """Holm's adjusted p of the k-th smallest (1-based): max over j <= k of (m - j + 1) p_(j), capped at 1."""
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i])
    out = [0.0] * m
    for k, i in enumerate(order):
        out[i] = min(1.0, max((m - j) * ps[order[j]] for j in range(k + 1)))
    return out


def _bh_by_definition(ps):
    """BH q of the k-th smallest: min over j >= k of m p_(j) / j, capped at 1."""
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i])
    out = [0.0] * m
    for k, i in enumerate(order):
        out[i] = min(1.0, min(m * ps[order[j]] / (j + 1) for j in range(k, m)))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_holm_and_bh_against_their_definitions(seed):
    ps = list(np.random.default_rng(seed).uniform(0, 0.2, size=7))
    assert stats.holm(ps) == pytest.approx(_holm_by_definition(ps))
    assert stats.benjamini_hochberg(ps) == pytest.approx(_bh_by_definition(ps))


def test_holm_and_bh_on_a_textbook_example():
    ps = [0.01, 0.04, 0.03, 0.005]
    assert stats.holm(ps) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.benjamini_hochberg(ps) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    # Holm rejects at family-wise 0.05 what Bonferroni's rejections contain, never fewer
    for subset in itertools.combinations(ps, 3):
        assert sum(h < 0.05 for h in stats.holm(subset)) >= sum(p * 3 < 0.05 for p in subset)


def _method(name: str, loss: str, values: dict[tuple[int, int], float]) -> MethodResult:
    runs = []
    for (teacher, seed), v in values.items():
        r = RunResult(name, seed, "w", 1.0, 0.0, 0, 0, 0, 0, 0, v, [0.0], 0.5, [], [], [], 0.0, 1)
        r.teacher_index = teacher
        runs.append(r)
    return MethodResult(name, loss, "", "k", 1.0, [], [], runs)


def test_one_primary_per_experiment_and_the_others_adjusted_together():
    keys = [(t, s) for t in (0, 1) for s in (0, 1, 2)]
    base = {k: 0.5 + 0.01 * i for i, k in enumerate(keys)}
    methods = {
        "kd": _method("kd", "kd", base),
        "extended_kd": _method(
            "extended_kd", "extended_kd", {k: v + 0.05 + 0.01 * (k[1] % 2) for k, v in base.items()}
        ),
        "fitnet": _method("fitnet", "fitnet", {k: v + 0.01 * (k[1] - 1) for k, v in base.items()}),
    }
    comparisons = [c for c in compare_all(methods) if c.metric == "unseen_acc_corrected"]
    primary = [c for c in comparisons if c.primary]
    assert [(c.method, c.baseline) for c in primary] == [("extended_kd", "kd")]
    assert primary[0].n == 6  # paired over (teacher, seed)
    assert primary[0].p_holm == primary[0].p and primary[0].verdict == "difference detected"
    explored = [c for c in compare_all(methods) if not c.primary and c.p is not None]
    assert [c.p_holm for c in explored] == pytest.approx(stats.holm([c.p for c in explored]))
    per_teacher = primary_per_teacher(methods, [], ("extended_kd", "kd"), 2)
    assert [(c.teacher, c.n) for c in per_teacher] == [(0, 3), (1, 3)]
    for c, t in zip(per_teacher, (0, 1), strict=True):
        d = [methods["extended_kd"].runs[i].unseen_acc_corrected - base[k] for i, k in enumerate(keys) if k[0] == t]
        assert c.diff_mean == pytest.approx(np.mean(d))
    assert primary_per_teacher(methods, [], ("extended_kd", "kd"), 1) == []
    # no primary declared: every comparison is exploratory
    assert not any(c.primary for c in compare_all(methods, primary=()))


def test_a_comparison_without_p_gets_no_adjustment_and_no_verdict():
    lone = Comparison("a", "kd", "unseen_acc_corrected", 1, 0.1, None, None)
    stats.adjust([lone], ("a", "kd"))
    assert lone.primary and lone.p is None and lone.verdict == "n < 3: no verdict"
