"""The typed results of `extkd reproduce`: what `results.json` holds and what the report and plots render.

Statistics: sample standard deviation (ddof=1; None with one run); method comparisons are paired by seed (runs of
different methods with the same seed share initialisation and data order) and give a Student-t 95% interval of the
mean difference.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

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
    val_seen_acc_corrected: float  # the selection criterion: no dropped-class label involved
    per_class_acc: list[float]
    per_class_acc_corrected: list[float]
    confusion_corrected: list[list[int]]
    wall_time_s: float
    epochs: int
    oracle: dict | None = None  # label-using correction (reported apart)


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
        return Stat.of([getattr(r, metric) for r in self.runs])

    def per_class(self, corrected: bool = True) -> tuple[list[float], list[float] | None]:
        arr = np.asarray([r.per_class_acc_corrected if corrected else r.per_class_acc for r in self.runs])
        return arr.mean(0).tolist(), (arr.std(0, ddof=1).tolist() if len(arr) > 1 else None)


@dataclasses.dataclass
class Comparison:
    """Paired per-seed difference `method - baseline` of one metric."""

    method: str
    baseline: str
    metric: str
    n: int
    diff_mean: float
    diff_std: float | None
    ci95: list[float] | None

    @classmethod
    def paired(cls, method: MethodResult, baseline: MethodResult, metric: str, resolution: float = 0.0) -> Comparison:
        """The paired t interval of the per-seed differences. `resolution`: the metric's step (one test example of
        the population it counts); the spread used for the interval is at least that, because accuracies move in
        such steps: two seeds that both differ by exactly one image would otherwise give an interval of width 0."""
        ours = {r.seed: getattr(r, metric) for r in method.runs}
        theirs = {r.seed: getattr(r, metric) for r in baseline.runs}
        seeds = sorted(set(ours) & set(theirs))
        diffs = np.asarray([ours[s] - theirs[s] for s in seeds], np.float64)
        if len(diffs) == 0:
            return cls(method.name, baseline.name, metric, 0, math.nan, None, None)
        mean = float(diffs.mean())
        if len(diffs) < 2:
            return cls(method.name, baseline.name, metric, 1, mean, None, None)
        std = float(diffs.std(ddof=1))
        half = t95(len(diffs) - 1) * max(std, resolution) / math.sqrt(len(diffs))
        return cls(method.name, baseline.name, metric, len(diffs), mean, std, [float(mean - half), float(mean + half)])

    @property
    def detected(self) -> bool:
        """Whether the 95% interval excludes 0 (False when there is no interval)."""
        return self.ci95 is not None and (self.ci95[0] > 0 or self.ci95[1] < 0)


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
        return cls(
            **{**raw, "methods": methods, "comparisons": [Comparison(**c) for c in raw["comparisons"]], "curve": curve}
        )


def _json_default(value: Any):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


BASELINES = ("kd", "extended_kd")


def metric_resolution(methods: dict[str, MethodResult], drop_classes: list[int]) -> dict[str, float]:
    """Each headline metric's step: 1 / the number of test images it counts (from a run's confusion matrix)."""
    runs = [r for m in methods.values() for r in m.runs if r.confusion_corrected]
    if not runs:
        return {}
    per_class = np.asarray(runs[0].confusion_corrected, np.float64).sum(1)
    unseen = per_class[list(drop_classes)].sum() if drop_classes else 0.0
    return {"test_acc_corrected": 1.0 / per_class.sum(), "unseen_acc_corrected": 1.0 / unseen if unseen else 0.0}


def compare_all(methods: dict[str, MethodResult], drop_classes: list[int] | tuple[int, ...] = ()) -> list[Comparison]:
    """Every distilling method against KD, then every other one against Extended-KD, on the headline metrics."""
    resolution = metric_resolution(methods, list(drop_classes))
    return [
        Comparison.paired(m, methods[baseline], metric, resolution.get(metric, 0.0))
        for baseline in BASELINES
        if baseline in methods
        for name, m in methods.items()
        if m.loss != "ce" and name not in BASELINES[: BASELINES.index(baseline) + 1]
        for metric in HEADLINE_METRICS
    ]
