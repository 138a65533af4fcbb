"""report.md and the plots, rendered from a hand-made `Results`: table cells equal the results, the prose names no
winner inside the interval, one seed prints n=1 and no error bar, and results.json round-trips."""

from __future__ import annotations

import pytest

from extkd_jax.experiment.plots import write_plots
from extkd_jax.experiment.report import MAIN_COLUMNS, MAIN_TABLE_BEGIN, MAIN_TABLE_END, verdict, write_report
from extkd_jax.experiment.results import Comparison, CurvePoint, GridPoint, MethodResult, Results, RunResult, Stat


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
    comparisons = [
        Comparison.paired(methods["extended_kd"], methods["kd"], m)
        for m in ("unseen_acc_corrected", "test_acc_corrected")
    ]
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
    assert ahead.detected and f"extended_kd is ahead of kd by {ahead.diff_mean * 100:.1f} points" in report
    assert f"95% CI {ahead.ci95[0] * 100:+.1f}..{ahead.ci95[1] * 100:+.1f}, 3 seeds" in report
    noisy = Comparison("extended_kd", "kd", "unseen_acc_corrected", 3, 0.002, 0.01, [-0.02, 0.024])
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
