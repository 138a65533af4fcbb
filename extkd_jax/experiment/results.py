"""The typed results of `extkd reproduce`: what `results.json` holds and what the report and plots render.

Statistics: sample standard deviation (ddof=1; None with one run); method comparisons are paired by (teacher, seed)
(runs of different methods with the same seed share initialisation and data order) and give a Student-t 95% interval
of the mean difference, a two-sided p, and its Holm / Benjamini-Hochberg adjustments (`stats`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from extkd_jax.experiment import stats

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (then the normal's 1.960).
T95 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)
HEADLINE_METRICS = ("unseen_acc_corrected", "test_acc_corrected")
SUMMARY_METRICS = (
    "test_acc",
    "seen_acc",
    "unseen_acc",
    "test_acc_corrected",
    "seen_acc_corrected",
    "unseen_acc_corrected",
)


def t95(df: int) -> float:
    return T95[df - 1] if df <= len(T95) else 1.960


@dataclasses.dataclass
class Stat:
    """Mean, sample std (ddof=1, None for n=1) and the values of one metric over runs."""

    mean: float
    std: float | None
    n: int
    values: list[float]

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        arr = np.asarray(values, np.float64)
        return cls(
            float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else None, len(arr), [float(v) for v in arr]
        )


@dataclasses.dataclass
class RunResult:
    """One trained student, evaluated on the test set before and after the label-free correction."""

    method: str
    seed: int
    workdir: str
    knob_value: float | None
    keep_fraction: float
    test_acc: float
    seen_acc: float
    unseen_acc: float
    test_acc_corrected: float
    seen_acc_corrected: float
    unseen_acc_corrected: float
    bias_shift: list[float]  # one per dropped class
    # the selection criterion (`selection.criterion`): accuracy on labelled seen-class validation images after the
    # shift fitted on a disjoint unlabelled pool (older versions: the shift fitted on every validation image)
    val_seen_acc_corrected: float
    per_class_acc: list[float]
    per_class_acc_corrected: list[float]
    confusion_corrected: list[list[int]]
    wall_time_s: float
    epochs: int
    oracle: dict | None = None  # label-using correction (reported apart)
    teacher_index: int = 0  # which of the experiment's teachers (reproduce.teacher_seeds) it learnt from


@dataclasses.dataclass
class GridPoint:
    value: float
    run: RunResult


@dataclasses.dataclass
class MethodResult:
    name: str
    loss: str
    description: str
    knob: str | None
    chosen: float | None
    tie: list[float]  # grid values tied with the chosen one on the criterion ([] when no tie)
    grid: list[GridPoint]
    runs: list[RunResult]  # the reported seeds, trained after the choice
    # grid values whose selection run stopped on a non-finite loss, {f"{value:g}": "run: error"}: not chosen
    diverged_grid: dict[str, str] = dataclasses.field(default_factory=dict)

    def stat(self, metric: str) -> Stat:
        """Over every reported run: the (teacher, seed) pairs."""
        return Stat.of([getattr(r, metric) for r in self.runs])

    def per_class(self, corrected: bool = True) -> tuple[list[float], list[float] | None]:
        arr = np.asarray([r.per_class_acc_corrected if corrected else r.per_class_acc for r in self.runs])
        return arr.mean(0).tolist(), (arr.std(0, ddof=1).tolist() if len(arr) > 1 else None)


@dataclasses.dataclass
class Comparison:
    """Paired per-(teacher, seed) difference `method - baseline` of one metric, with its two-sided paired-t p and
    that p adjusted (`stats.adjust`: Holm, Benjamini-Hochberg) within the experiment's exploratory family."""

    method: str
    baseline: str
    metric: str
    n: int
    diff_mean: float
    diff_std: float | None
    ci95: list[float] | None
    p: float | None = None
    p_holm: float | None = None
    q_bh: float | None = None
    primary: bool = False  # the comparison declared in reproduce.primary before the runs
    teacher: int | None = None  # one teacher's runs only (the primary, per teacher); None: every teacher pooled

    @classmethod
    def paired(
        cls,
        method: MethodResult,
        baseline: MethodResult,
        metric: str,
        resolution: float = 0.0,
        teacher: int | None = None,
    ) -> Comparison:
        """The paired t interval and p of the per-(teacher, seed) differences (`teacher`: that teacher's runs only).
        `resolution`: the metric's step (one test example of the population it counts); the spread used for the
        interval and the p is at least that, because accuracies move in such steps: two seeds that both differ by
        exactly one image would otherwise give an interval of width 0."""
        ours = {(r.teacher_index, r.seed): getattr(r, metric) for r in method.runs}
        theirs = {(r.teacher_index, r.seed): getattr(r, metric) for r in baseline.runs}
        keys = sorted(k for k in set(ours) & set(theirs) if teacher is None or k[0] == teacher)
        diffs = np.asarray([ours[k] - theirs[k] for k in keys], np.float64)
        names = (method.name, baseline.name, metric)
        if len(diffs) == 0:
            return cls(*names, 0, math.nan, None, None, teacher=teacher)
        mean = float(diffs.mean())
        if len(diffs) < 2:
            return cls(*names, 1, mean, None, None, teacher=teacher)
        std = float(diffs.std(ddof=1))
        half = t95(len(diffs) - 1) * max(std, resolution) / math.sqrt(len(diffs))
        interval = [float(mean - half), float(mean + half)]
        p = stats.paired_t_p(mean, max(std, resolution), len(diffs))
        return cls(*names, len(diffs), mean, std, interval, p, teacher=teacher)

    @property
    def verdict(self) -> str:
        """From the adjusted figures (`stats.verdict_word`): no verdict below 3 paired values."""
        return stats.verdict_word(self)

    @property
    def detected(self) -> bool:
        """Whether a verdict is drawn and it detects a difference (the adjusted p below 0.05, n >= 3)."""
        return self.verdict == "difference detected"


@dataclasses.dataclass
class CurvePoint:
    method: str
    keep_fraction: float
    unseen_acc: Stat
    unseen_acc_corrected: Stat
    wall_time_s: float  # of the point's own runs (0 for keep_fraction 0: the main runs)


@dataclasses.dataclass
class Results:
    preset: str
    command: str
    dataset: dict  # name, source, note, num_classes, class_names, sizes
    drop_classes: list[int]
    hardware: dict
    teacher: dict  # model, test_acc, per_class_acc, unseen_acc, epochs, wall_time_s, workdir
    student_model: str
    seeds: list[int]
    selection_seed: int
    epochs: int
    correction: str  # how the headline correction was chosen, in words
    methods: dict[str, MethodResult]
    comparisons: list[Comparison]
    curve: list[CurvePoint]
    wall_time_s: float
    # methods left out because a run stopped on a non-finite loss: {method: "run: error"}
    diverged: dict[str, str] = dataclasses.field(default_factory=dict)
    # the selection's image sets (`selection.SelectionPlan.summary`); {} in results of older versions
    selection: dict = dataclasses.field(default_factory=dict)
    # the comparison declared before the runs (reproduce.primary), [method, baseline]; [] when none
    primary: list[str] = dataclasses.field(default_factory=list)
    primary_by_teacher: list[Comparison] = dataclasses.field(default_factory=list)  # with >= 2 teachers
    teachers: int = 1  # reproduce.teacher_seeds: teachers, each with its own students over the reported seeds
    # the temperature of the methods built on KD's KL that do not tune it: value, source, methods, reason
    temperature: dict = dataclasses.field(default_factory=dict)

    @property
    def older_protocol(self) -> bool:
        """Results of a version before the blind selection and the declared primary comparison (no `selection`):
        their knobs were chosen by the older criterion, and their primary comparison was set after the runs."""
        return not self.selection

    @property
    def class_names(self) -> list[str]:
        return self.dataset["class_names"]

    @property
    def dropped_names(self) -> list[str]:
        return [self.class_names[c] for c in self.drop_classes]

    @property
    def training_time_s(self) -> float:
        """The wall time of every run behind these results (teacher, grid, reported seeds, curve), summed: what a
        rerun from scratch costs on the same machine, whatever was resumed."""
        runs = [r for m in self.methods.values() for r in m.runs + [p.run for p in m.grid]]
        teachers = self.teacher["wall_time_s"] + sum(t["wall_time_s"] for t in self.teacher.get("others", {}).values())
        return teachers + sum(r.wall_time_s for r in runs) + sum(p.wall_time_s for p in self.curve)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, default=_json_default)

    @classmethod
    def from_json(cls, text: str) -> Results:
        raw = json.loads(text)

        def run(d: dict) -> RunResult:
            return RunResult(**d)

        methods = {}
        for name, m in raw["methods"].items():
            grid = [GridPoint(g["value"], run(g["run"])) for g in m["grid"]]
            methods[name] = MethodResult(**{**m, "grid": grid, "runs": [run(r) for r in m["runs"]]})
        curve = [
            CurvePoint(
                **{
                    **p,
                    "unseen_acc": Stat(**p["unseen_acc"]),
                    "unseen_acc_corrected": Stat(**p["unseen_acc_corrected"]),
                }
            )
            for p in raw["curve"]
        ]
        comparisons = [Comparison(**c) for c in raw["comparisons"]]
        by_teacher = [Comparison(**c) for c in raw.get("primary_by_teacher", [])]
        if any("p" not in c for c in raw["comparisons"]):  # an older version's file: p and adjustments from its runs
            if "primary" not in raw:  # the default pair, when both methods are there
                raw["primary"] = list(DEFAULT_PRIMARY) if all(m in methods for m in DEFAULT_PRIMARY) else []
            backfill_p(comparisons, methods, raw["drop_classes"])
            stats.adjust(comparisons, raw["primary"])
        extra = {"methods": methods, "comparisons": comparisons, "curve": curve, "primary_by_teacher": by_teacher}
        return cls(**{**raw, **extra})


def _json_default(value: Any):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


BASELINES = ("kd", "extended_kd")
DEFAULT_PRIMARY = ("extended_kd", "kd")  # configs/base.py's reproduce.primary


def backfill_p(comparisons: list[Comparison], methods: dict[str, MethodResult], drop_classes: list[int]) -> None:
    """The p of comparisons read from an older version's results.json, from their stored n, mean and std (with the
    metric's resolution as the floor of the spread, as `Comparison.paired` does)."""
    resolution = metric_resolution(methods, drop_classes)
    for c in comparisons:
        if c.p is None and c.diff_std is not None:
            c.p = stats.paired_t_p(c.diff_mean, max(c.diff_std, resolution.get(c.metric, 0.0)), c.n)


def metric_resolution(methods: dict[str, MethodResult], drop_classes: list[int]) -> dict[str, float]:
    """Each headline metric's step: 1 / the number of test images it counts (from a run's confusion matrix)."""
    runs = [r for m in methods.values() for r in m.runs if r.confusion_corrected]
    if not runs:
        return {}
    per_class = np.asarray(runs[0].confusion_corrected, np.float64).sum(1)
    unseen = per_class[list(drop_classes)].sum() if drop_classes else 0.0
    return {"test_acc_corrected": 1.0 / per_class.sum(), "unseen_acc_corrected": 1.0 / unseen if unseen else 0.0}


def compare_all(
    methods: dict[str, MethodResult],
    drop_classes: list[int] | tuple[int, ...] = (),
    primary: tuple[str, ...] | list[str] = DEFAULT_PRIMARY,
) -> list[Comparison]:
    """Every distilling method against KD, then every other one against Extended-KD, on the headline metrics; the
    `primary` pair on the dropped classes is marked, the others adjusted as one exploratory family."""
    resolution = metric_resolution(methods, list(drop_classes))
    comparisons = [
        Comparison.paired(m, methods[baseline], metric, resolution.get(metric, 0.0))
        for baseline in BASELINES
        if baseline in methods
        for name, m in methods.items()
        if m.loss != "ce" and name not in BASELINES[: BASELINES.index(baseline) + 1]
        for metric in HEADLINE_METRICS
    ]
    stats.adjust(comparisons, tuple(primary))
    return comparisons


def primary_per_teacher(
    methods: dict[str, MethodResult], drop_classes: list[int], primary: tuple[str, ...] | list[str], teachers: int
) -> list[Comparison]:
    """The primary comparison on each teacher's runs alone (with >= 2 teachers; its p unadjusted, descriptive)."""
    if teachers < 2 or len(primary) != 2 or not all(m in methods for m in primary):
        return []
    metric = stats.PRIMARY_METRIC
    resolution = metric_resolution(methods, drop_classes).get(metric, 0.0)
    out = [Comparison.paired(methods[primary[0]], methods[primary[1]], metric, resolution, k) for k in range(teachers)]
    for c in out:
        c.p_holm = c.q_bh = c.p
    return out
