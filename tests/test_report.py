"""report.md and the plots, rendered from a hand-made `Results`: table cells equal the results, the prose names no
winner inside the interval, verdicts read the adjusted figures (none below 3 seeds), one seed prints n=1 and no error
bar, results.json round-trips, and the committed results of older versions load with p and adjustments computed."""

from __future__ import annotations

import dataclasses

import pytest

from extkd_jax.experiment.plots import write_plots
from extkd_jax.experiment.report import MAIN_COLUMNS, MAIN_TABLE_BEGIN, MAIN_TABLE_END, verdict, write_report
from extkd_jax.experiment.results import (
    Comparison,
    CurvePoint,
    GridPoint,
    MethodResult,
    Results,
    RunResult,
    Stat,
    compare_all,
)
from tests.tiny import REPO_ROOT


def _run(method: str, seed: int, unseen: float, test: float, knob=None) -> RunResult:
    per_class = [0.9] * 10
    per_class[3] = unseen
    confusion = [[10 if i == j else 0 for j in range(10)] for i in range(10)]
    return RunResult(
        method,
        seed,
        f"runs/{method}/seed_{seed}",
        knob,
        0.0,
        test - 0.01,
        test,
        unseen / 2,
        test,
        test + 0.001,
        unseen,
        [1.5 + seed],
        test - 0.02,
        per_class,
        per_class,
        confusion,
        12.0,
        3,
    )


def _results(seeds=(0, 1, 2)) -> Results:
    unseen = {"scratch_transfer": [0.20, 0.22, 0.21], "kd": [0.60, 0.62, 0.61], "extended_kd": [0.70, 0.74, 0.72]}
    methods = {}
    for name, values in unseen.items():
        loss = "ce" if name.startswith("scratch") else name
        knob = None if loss == "ce" else ("temperature" if name == "kd" else "segment_weight")
        chosen = None if knob is None else 4.0
        runs = [_run(name, s, values[i], 0.8 + 0.01 * i, chosen) for i, s in enumerate(seeds)]
        grid = [] if knob is None else [GridPoint(v, _run(name, 9, 0.5, 0.7, v)) for v in (2.0, 4.0)]
        methods[name] = MethodResult(name, loss, f"{name} description", knob, chosen, [], grid, runs)
    comparisons = compare_all(methods)  # extended_kd - kd: on the dropped class (primary), on the whole test set
    curve = [CurvePoint("kd", f, Stat.of([0.3 + f]), Stat.of([0.6 + f]), 10.0 * f) for f in (0.0, 0.02)]
    return Results(
        preset="synthetic",
        command="extkd reproduce --config=synthetic --workdir=/tmp/x",
        dataset={
            "name": "cifar10",
            "source": "npz",
            "note": "",
            "num_classes": 10,
            "class_names": [str(i) for i in range(10)],
            "train_size": 900,
            "transfer_size": 810,
            "val_size": 100,
            "test_size": 100,
        },
        drop_classes=[3],
        hardware={
            "platform": "cpu",
            "device_kind": "cpu",
            "device_count": 1,
            "process_count": 1,
            "hostname": "h",
            "cpu_count": 2,
        },
        teacher={
            "model": "resnet14",
            "test_acc": 0.85,
            "per_class_acc": [0.85] * 10,
            "unseen_acc": 0.7,
            "epochs": 8,
            "wall_time_s": 100.0,
            "workdir": "teacher",
        },
        student_model="resnet8",
        seeds=list(seeds),
        selection_seed=len(seeds),
        epochs=5,
        correction="one shift",
        methods=methods,
        comparisons=comparisons,
        curve=curve,
        wall_time_s=500.0,
    )


def _main_table(report: str) -> dict[str, dict[str, str]]:
    lines = report.split(MAIN_TABLE_BEGIN)[1].split(MAIN_TABLE_END)[0].strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {
        cells[0]: dict(zip(header, cells, strict=True))
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])
    }


def test_main_table_cells_equal_the_results(tmp_path):
    results = _results()
    report = write_report(results, tmp_path, {}).read_text()
    table = _main_table(report)
    assert set(table) == set(results.methods)
    for name, method in results.methods.items():
        for key, header in MAIN_COLUMNS:
            stat = method.stat(key)
            mean, std = (float(x) for x in table[name][header].split("±"))
            assert mean == pytest.approx(round(stat.mean * 100, 1), abs=0.051)
            assert std == pytest.approx(round(stat.std * 100, 1), abs=0.051)  # sample std (ddof=1)
    assert "sample standard deviation (ddof=1)" in report


def test_prose_states_the_interval_and_names_no_winner_inside_it(tmp_path):
    results = _results()
    report = write_report(results, tmp_path, {}).read_text()
    ahead, overall = results.comparisons  # unseen: +11 points, consistent; test: identical per seed
    assert ahead.primary and not overall.primary and ahead.detected
    assert f"primary: extended_kd is ahead of kd by {ahead.diff_mean * 100:.1f} points" in report
    assert f"95% CI {ahead.ci95[0] * 100:+.1f}..{ahead.ci95[1] * 100:+.1f}, 3 seeds, p = " in report
    noisy = Comparison("extended_kd", "kd", "unseen_acc_corrected", 3, 0.002, 0.01, [-0.02, 0.024], 0.7, 0.7, 0.7)
    assert verdict(noisy).startswith("no difference detected between extended_kd and kd")
    assert "best" not in report.lower()
    assert "## Knob selection" in report and "**chosen**" in report
    assert "## Dark-knowledge curve" in report


def test_one_seed_prints_n1_and_no_error_bar(tmp_path):
    results = _results(seeds=(0,))
    report = write_report(results, tmp_path, {}).read_text()
    table = _main_table(report)
    assert table["kd"]["unseen acc corrected (%)"] == "60.0 (n=1)"
    assert "±" not in report.split(MAIN_TABLE_BEGIN)[1].split(MAIN_TABLE_END)[0]
    assert "on one seed (n=1): no interval, no verdict" in report


def test_results_json_round_trip():
    results = _results()
    again = Results.from_json(results.to_json())
    assert again == results


def test_plots_are_written_and_linked(tmp_path):
    results = _results()
    plots = write_plots(results, tmp_path)
    assert set(plots.values()) == {
        "per_class_accuracy.png",
        "per_class_accuracy_uncorrected.png",
        "unseen_accuracy.png",
        "training_curves.png",
        "confusion_extended_kd.png",
        "keep_fraction_curve.png",
    }
    for name in plots.values():
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = write_report(results, tmp_path, plots).read_text()
    assert all(f"({name})" in report for name in plots.values())


def test_verdicts_read_the_adjusted_p_and_none_below_three_seeds(tmp_path):
    """The primary comparison is judged by its own p, the exploratory ones by Holm's; fewer than 3 paired values
    draw none; the report says how many comparisons were made and that one teacher conditions them."""
    results = _results()
    extra = Comparison("dkd", "kd", "unseen_acc_corrected", 3, 0.03, 0.01, [0.005, 0.055], 0.03, 0.09, 0.09)
    primary = Comparison("extended_kd", "kd", "unseen_acc_corrected", 3, 0.03, 0.01, [0.005, 0.055], 0.03, 0.03, 0.03)
    primary.primary = True
    assert primary.verdict == "difference detected"  # p 0.03 < 0.05: its own p
    assert extra.verdict == "no difference detected"  # the same p, 0.09 after Holm
    assert verdict(extra).startswith("no difference detected") and "Holm-adjusted p = 0.090" in verdict(extra)
    two = compare_all(_results(seeds=(0, 1)).methods)
    assert two[0].ci95 is not None and two[0].verdict == "n < 3: no verdict" and not two[0].detected
    assert verdict(two[0]).endswith("n < 3: no verdict")
    report = write_report(results, tmp_path, {}).read_text()
    assert "2 comparison(s) in this report" in report and "The other 1 are exploratory" in report
    assert "every interval and verdict is conditional on this teacher" in report
    assert "Every comparison has at least 3 paired values." in report and "fewer than 3" not in report
    report = write_report(_results(seeds=(0, 1)), tmp_path, {}).read_text()
    assert f"{len(two)} comparison(s) with fewer than 3 paired values" in report
    assert f"{two[0].method} - {two[0].baseline} (" in report and "n = 2)" in report


@pytest.mark.parametrize("name", ["zoo_cifar10", "methods_mnist"])
def test_committed_results_of_older_versions_load_with_p_and_adjustments(name):
    """A results.json without p: the p of each comparison is the paired t test of its stored per-seed values
    (scipy's ttest_rel, independent of ours), Holm and BH adjust the exploratory family, the pair is primary."""
    from scipy import stats as scipy_stats

    from extkd_jax.experiment.results import metric_resolution
    from extkd_jax.experiment.stats import benjamini_hochberg, holm

    results = Results.from_json((REPO_ROOT / "docs" / "results" / name / "results.json").read_text())
    resolution = metric_resolution(results.methods, results.drop_classes)
    checked = 0
    for c in results.comparisons:
        ours = [getattr(r, c.metric) for r in results.methods[c.method].runs]
        theirs = [getattr(r, c.metric) for r in results.methods[c.baseline].runs]
        if c.diff_std is not None and c.diff_std > resolution[c.metric]:  # no floor on the spread: scipy's test
            assert c.p == pytest.approx(scipy_stats.ttest_rel(ours, theirs).pvalue, rel=1e-9)
            checked += 1
    assert checked >= 5
    primary = [c for c in results.comparisons if c.primary]
    assert [(c.method, c.baseline, c.metric) for c in primary] == [("extended_kd", "kd", "unseen_acc_corrected")]
    family = [c for c in results.comparisons if not c.primary and c.p is not None]
    assert [c.p_holm for c in family] == pytest.approx(holm([c.p for c in family]))
    assert [c.q_bh for c in family] == pytest.approx(benjamini_hochberg([c.p for c in family]))
    assert all(c.p_holm >= c.p and c.q_bh >= c.p for c in family)


def test_two_teachers_without_the_primary_method_list_no_per_teacher_primary(tmp_path):
    """Two teachers and no Extended-KD run (a method-against-KD report): the teachers sentence ends there, with no
    announced per-teacher list left empty; with the primary comparison the list follows, one line per teacher."""
    results = _results()
    results.teachers = 2
    results.methods["dkd"] = results.methods.pop("extended_kd")
    results.comparisons = compare_all(results.methods)
    report = write_report(results, tmp_path, {}).read_text()
    assert (
        "2 teachers, each with its own students over the reported seeds: comparisons pair (teacher, seed).\n" in report
    )
    assert "per teacher" not in report
    results = _results()
    results.teachers = 2
    (primary,) = [c for c in results.comparisons if c.primary]
    results.primary_by_teacher = [dataclasses.replace(primary, teacher=i) for i in (0, 1)]
    report = write_report(results, tmp_path, {}).read_text()
    assert "(teacher, seed); the primary comparison per teacher:\n- teacher 0: " in report and "- teacher 1: " in report
