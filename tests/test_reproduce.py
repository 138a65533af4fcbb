"""`extkd reproduce`: the label-free correction, selection that never reads dropped-class labels, paired statistics,
equal budgets, and the smoke preset end to end through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from extkd_jax.experiment import bias_correction as bc
from extkd_jax.experiment import stats
from extkd_jax.experiment.reproduce import _choose, check_experiment
from extkd_jax.experiment.results import Comparison, GridPoint, MethodResult, RunResult, Stat
from extkd_jax.experiment.scoring import Scorer
from tests.tiny import tiny_config, tiny_setup


def _fractions(logits, classes):
    return [float((logits.argmax(1) == c).mean()) for c in classes]


def test_per_class_shifts_match_the_teachers_frequency_of_each_class():
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(2000, 6)) * 2
    student = teacher + rng.normal(size=teacher.shape)
    student[:, 2] -= 7.0  # both dropped classes under-predicted, by different amounts
    student[:, 4] -= 3.0
    shifts = bc.shifts_to_match_teacher(student, teacher, [2, 4])
    achieved = _fractions(bc.shift_logits(student, [2, 4], shifts), [2, 4])
    target = _fractions(teacher, [2, 4])
    np.testing.assert_allclose(achieved, target, atol=2 / 2000)  # within one image of each target
    assert shifts[0] > shifts[1] > 0
    # one shared shift matches only the joint frequency, and misses the per-class ones
    shared = bc.shifts_to_match_teacher(student, teacher, [2, 4], shared=True)
    assert shared[0] == shared[1]
    joint = sum(_fractions(bc.shift_logits(student, [2, 4], shared), [2, 4]))
    assert joint == pytest.approx(sum(target), abs=2 / 2000)
    assert (
        max(
            abs(a - t)
            for a, t in zip(_fractions(bc.shift_logits(student, [2, 4], shared), [2, 4]), target, strict=True)
        )
        > 0.01
    )
    # only the dropped classes' logits move
    moved = bc.shift_logits(student, [2, 4], shifts)
    np.testing.assert_array_equal(np.delete(moved, [2, 4], 1), np.delete(student, [2, 4], 1))


def test_no_dropped_class_means_no_shift():
    assert bc.shifts_to_match_teacher(np.zeros((3, 4)), np.zeros((3, 4)), []) == []
    assert bc.shift_maximizing_accuracy(np.zeros((3, 4)), np.zeros(3, int), []) == 0.0


def test_oracle_shift_maximises_accuracy():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=400)
    logits = rng.normal(size=(400, 4))
    logits[np.arange(400), labels] += 2.0
    logits[:, 1] -= 5.0
    shift = bc.shift_maximizing_accuracy(logits, labels, [1])
    grid = np.linspace(-20, 40, 601)
    best = max((bc.shift_logits(logits, [1], b).argmax(1) == labels).mean() for b in grid)
    assert (bc.shift_logits(logits, [1], shift).argmax(1) == labels).mean() == pytest.approx(best)


def _run(val_seen_acc_corrected: float) -> RunResult:
    return RunResult(
        "extended_kd", 9, "w", None, 0.0, 0, 0, 0, 0, 0, 0, [0.0], val_seen_acc_corrected, [], [], [], 0.0, 1
    )


def test_the_scorers_criterion_fits_the_shift_on_the_pool_and_reads_only_the_labelled_set():
    """Scorer.criterion (what `score` records as the selection criterion) is the selection module's criterion on
    the experiment's plan, with the shift fitted on the pool: what a student predicts on the dropped-class images
    outside the pool, and every label of the pool, cannot move it or the choice; the old criterion (shift fitted on
    every image, accuracy on its seen-class subset) chose the other student."""
    from extkd_jax.experiment.selection import SelectionPlan, criterion_of_plan

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=400)  # class 2 is dropped
    teacher = np.eye(3)[labels] * 5.0
    plan = SelectionPlan.of(labels, 3, [2], 0.5, seed=1)
    outside = np.setdiff1d(np.arange(400), np.concatenate([plan.labelled, plan.pool]))
    a = np.eye(3)[labels] * 3.0 + rng.normal(size=(400, 3))
    a[labels == 2] = np.eye(3)[rng.integers(0, 2, size=(labels == 2).sum())] * 3.0  # dropped images look seen
    a[:, 2] -= 2.0
    b = a.copy()  # the same on the pool, worse on 10 labelled images...
    wrong = plan.labelled[:10]
    b[wrong] = np.eye(3)[(labels[wrong] + 1) % 2] * 6.0
    b[outside, 2] = 9.0  # ...but recognises the dropped-class images the old criterion counted
    scorer = Scorer.__new__(Scorer)
    scorer.selection, scorer.shared_shift, scorer.teacher_logits = plan, False, {"teacher": {"val": teacher}}
    score = {n: scorer.criterion(z) for n, z in (("a", a), ("b", b))}
    assert score == {n: criterion_of_plan(plan, z, teacher) for n, z in (("a", a), ("b", b))}

    def old(z):
        shifts = bc.shifts_to_match_teacher(z, teacher, [2])
        return float((bc.shift_logits(z, [2], shifts).argmax(1) == labels)[labels != 2].mean())

    assert old(b) > old(a)  # the old criterion would choose B for its dropped-class recognition
    assert score["a"] > score["b"]
    chosen, tie = _choose([GridPoint(0.1, _run(score["a"])), GridPoint(1.0, _run(score["b"]))], default=1.0)
    assert chosen == 0.1 and tie == []
    b_other = b.copy()
    b_other[outside] = rng.normal(size=(len(outside), 3))
    assert scorer.criterion(b_other) == score["b"]


def test_an_exact_tie_is_reported_and_goes_to_the_configured_value():
    chosen, tie = _choose([GridPoint(v, _run(0.5)) for v in (0.1, 1.0, 10.0)], default=1.0)
    assert chosen == 1.0 and tie == [0.1, 1.0, 10.0]


def test_sample_std_and_paired_t_interval_against_hand_computation():
    assert Stat.of([0.5]).std is None and Stat.of([0.5]).n == 1
    assert Stat.of([0.1, 0.2, 0.6]).std == pytest.approx(np.sqrt(((0.1 - 0.3) ** 2 + 0.1**2 + 0.3**2) / 2))

    def method(name, values):
        runs = [
            RunResult(name, s, "w", None, 0.0, 0, 0, 0, 0, 0, v, [0.0], 0, [], [], [], 0, 1)
            for s, v in enumerate(values)
        ]
        return MethodResult(name, "kd", "", None, None, [], [], runs)

    ours, kd = method("extended_kd", [0.80, 0.75, 0.90]), method("kd", [0.70, 0.72, 0.71])
    c = Comparison.paired(ours, kd, "unseen_acc_corrected")
    stats.adjust([c], ("extended_kd", "kd"))  # the primary comparison: judged at its own p
    diffs = np.array([0.10, 0.03, 0.19])
    half = 4.303 * diffs.std(ddof=1) / np.sqrt(3)  # t(0.975, df=2) = 4.303
    assert c.n == 3 and c.diff_mean == pytest.approx(diffs.mean())
    assert c.ci95 == pytest.approx([diffs.mean() - half, diffs.mean() + half])
    assert not c.detected  # 0.107 +- 0.199: the interval contains 0
    clear = Comparison.paired(method("extended_kd", [0.80, 0.82, 0.84]), kd, "unseen_acc_corrected")
    stats.adjust([clear], ("extended_kd", "kd"))
    assert clear.detected and clear.ci95[0] > 0 and clear.p < 0.05
    one = Comparison.paired(method("a", [0.9]), method("kd", [0.1]), "unseen_acc_corrected")
    assert one.n == 1 and one.diff_std is None and one.ci95 is None and not one.detected
    # two seeds that both gain exactly one of 1000 images: no spread to measure, yet no certainty either
    step = method("extended_kd", [0.338, 0.364]), method("kd", [0.337, 0.363])
    bare = Comparison.paired(*step, "unseen_acc_corrected")  # without the metric's resolution: width 0, p 0
    assert bare.ci95[1] - bare.ci95[0] == pytest.approx(0.0, abs=1e-12) and bare.p == 0.0
    floored = Comparison.paired(*step, "unseen_acc_corrected", resolution=1 / 1000)
    half = 12.706 * (1 / 1000) / np.sqrt(2)  # t(0.975, df=1) = 12.706, spread floored at one image
    assert floored.ci95 == pytest.approx([0.001 - half, 0.001 + half]) and floored.p > 0.05
    stats.adjust([bare], ("extended_kd", "kd"))
    assert bare.verdict == "n < 3: no verdict" and not bare.detected  # two seeds: the interval only


def test_same_seed_same_start_for_every_method():
    """Runs of different methods with one seed start from the same student weights (connectors come from a stream
    of their own), so per-seed differences are paired; another seed starts elsewhere."""
    kd = tiny_setup(tiny_config(".", **{"loss.name": "kd", "seed": 4}), (8, 8, 1), 3)
    ext = tiny_setup(tiny_config(".", **{"loss.name": "ce", "seed": 4}), (8, 8, 1), 3)
    other = tiny_setup(tiny_config(".", **{"loss.name": "kd", "seed": 5}), (8, 8, 1), 3)
    same = jax.tree.map(np.array_equal, kd.variables["params"]["model"], ext.variables["params"]["model"])
    assert all(jax.tree.leaves(same))
    differ = jax.tree.map(np.array_equal, kd.variables["params"]["model"], other.variables["params"]["model"])
    assert not any(jax.tree.leaves(differ))


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"reproduce.grid.kd": (2.0, 4.0), "reproduce.grid.extended_kd": (1.0,)}, "unequal tuning budgets"),
        ({"seeds": 3, "reproduce.selection_seed": 1}, "is a reported seed"),
        ({"reproduce.keep_fractions": (1.5,)}, "keep_fractions holds 1.5"),
        ({"reproduce.primary": ("extended_kd", "hinton")}, r"reproduce.primary=\('extended_kd', 'hinton'\)"),
        ({"reproduce.primary": ("kd", "kd")}, "two different names"),
        ({"reproduce.teacher_seeds": 0}, "teacher_seeds=0: expected at least 1"),
        ({"reproduce.selection_labelled_fraction": 1.0}, "selection_labelled_fraction=1.0: expected a fraction"),
    ],
)
def test_unfair_experiments_are_refused(overrides, message):
    config = tiny_config(
        ".",
        **{"teacher.name": "mlp", "data.drop_classes": (3,), "reproduce.methods": ("kd", "extended_kd"), **overrides},
    )
    with pytest.raises(ValueError, match=message):
        check_experiment(config)


@pytest.mark.slow
def test_reproduce_smoke_preset_through_the_cli(tmp_path):
    workdir = tmp_path / "smoke"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    command = [
        sys.executable,
        "-m",
        "extkd_jax.cli",
        "reproduce",
        "--config=smoke",
        "--config.data.drop_classes=(3, 8)",
        "--config.reproduce.keep_fractions=(0.1,)",
        "--config.reproduce.curve_methods=('kd',)",
        f"--workdir={workdir}",
    ]
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    results = json.loads((workdir / "results.json").read_text())
    report = (workdir / "report.md").read_text()
    methods = ("scratch_full", "scratch_transfer", "kd", "fitnet", "extended_kd")
    assert tuple(results["methods"]) == methods and results["drop_classes"] == [3, 8]
    assert results["seeds"] == [0, 1] and results["selection_seed"] == 2
    for name, m in results["methods"].items():
        assert [r["seed"] for r in m["runs"]] == [0, 1]
        assert all(len(r["bias_shift"]) == 2 for r in m["runs"])  # one shift per dropped class and run
        if name in ("kd", "fitnet", "extended_kd"):  # equal budgets: 2 grid runs each, on the selection seed
            assert [g["run"]["seed"] for g in m["grid"]] == [2, 2]
            assert all("test_acc_corrected" in g["run"] and "val_seen_acc_corrected" in g["run"] for g in m["grid"])
            assert m["chosen"] in [g["value"] for g in m["grid"]]
            assert all(r["knob_value"] == m["chosen"] for r in m["runs"])
        else:
            assert m["grid"] == []
    pairs = [("fitnet", "kd"), ("extended_kd", "kd"), ("fitnet", "extended_kd")]
    assert {(c["method"], c["baseline"], c["metric"]) for c in results["comparisons"]} == {
        (m, b, k) for m, b in pairs for k in ("unseen_acc_corrected", "test_acc_corrected")
    }
    for c in results["comparisons"]:
        mine = {r["seed"]: r[c["metric"]] for r in results["methods"][c["method"]]["runs"]}
        base = {r["seed"]: r[c["metric"]] for r in results["methods"][c["baseline"]]["runs"]}
        diffs = [mine[s] - base[s] for s in (0, 1)]
        assert c["n"] == 2 and c["diff_mean"] == pytest.approx(np.mean(diffs))
        assert c["diff_std"] == pytest.approx(np.std(diffs, ddof=1))
    selection = results["selection"]  # computed from the plan's index sets
    assert selection["overlap"] == 0 and selection["dropped_in_labelled"] == 0
    assert selection["labelled_size"] > 0 and selection["pool_size"] > 0
    assert results["primary"] == ["extended_kd", "kd"] and results["teachers"] == 1
    primary = [c for c in results["comparisons"] if c["primary"]]
    assert [(c["method"], c["baseline"], c["metric"]) for c in primary] == [
        ("extended_kd", "kd", "unseen_acc_corrected")
    ]
    assert all({"p", "p_holm", "q_bh"} <= set(c) for c in results["comparisons"])
    # KD's temperature, chosen on its grid, is the one fitnet and extended_kd ran at
    t = results["temperature"]
    assert t["value"] == results["methods"]["kd"]["chosen"] and t["methods"] == ["fitnet", "extended_kd"]
    ran_at = json.loads((workdir / results["methods"]["fitnet"]["runs"][0]["workdir"] / "config.json").read_text())
    assert ran_at["config"]["loss"]["temperature"] == t["value"]
    assert f"ran at T = {t['value']:g}" in report and "n < 3: no verdict" in report
    assert "conditional on this teacher" in report
    assert [(p["method"], p["keep_fraction"]) for p in results["curve"]] == [("kd", 0.0), ("kd", 0.1)]
    assert "## Dark-knowledge curve" in report and "keep_fraction_curve.png" in report
    for png in ("per_class_accuracy.png", "training_curves.png", "confusion_extended_kd.png", "unseen_accuracy.png"):
        assert (workdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png in report
    assert (workdir / "teacher" / "tensorboard").is_dir()
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    rerun = json.loads((workdir / "results.json").read_text())
    for name in methods:  # every run was reused: the same figures
        assert rerun["methods"][name]["runs"] == results["methods"][name]["runs"]


@pytest.mark.slow
def test_every_method_in_one_smoke_experiment(tmp_path, capsys):
    """`smoke:all`: each method of docs/methods.md trained, tuned on its two-value grid and scored, the PURF teacher
    trained beside the plain one."""
    from extkd_jax import cli

    assert cli.main(["reproduce", "--config=smoke:all", "--config.seeds=1", f"--workdir={tmp_path}"]) == 0
    capsys.readouterr()
    results = json.loads((tmp_path / "results.json").read_text())
    from extkd_jax.configs.base import ZOO_METHODS
    from extkd_jax.experiment.runs import METHODS

    assert set(results["methods"]) == set(METHODS) - {"at", *ZOO_METHODS}  # MLPs: no feature maps to attend to
    for name, m in results["methods"].items():
        assert len(m["runs"]) == 1 and np.isfinite(m["runs"][0]["test_acc"])
        assert len(m["grid"]) == (2 if METHODS[name].distils else 0)
    assert (tmp_path / "teacher_purf" / "metrics.jsonl").exists()
    assert "teacher_purf" in results["teacher"]["others"]
    assert {c["baseline"] for c in results["comparisons"]} == {"kd", "extended_kd"}


@pytest.mark.slow
def test_the_kd_zoo_in_one_smoke_experiment(tmp_path, capsys):
    """`smoke:zoo`: each zoo method an MLP can run tuned on its two-value grid, scored and compared seed by seed."""
    from extkd_jax import cli
    from extkd_jax.configs.base import SPATIAL_METHODS, ZOO_METHODS
    from extkd_jax.experiment.runs import METHODS

    assert cli.main(["reproduce", "--config=smoke:zoo", "--config.seeds=1", f"--workdir={tmp_path}"]) == 0
    capsys.readouterr()
    results = json.loads((tmp_path / "results.json").read_text())
    zoo = set(ZOO_METHODS) - set(SPATIAL_METHODS)  # nst, ft need feature maps
    assert set(results["methods"]) == {"scratch_full", "scratch_transfer", "kd", "extended_kd", *zoo}
    for name in zoo:
        m = results["methods"][name]
        assert len(m["grid"]) == 2 and np.isfinite(m["runs"][0]["test_acc"])
        config = json.loads((tmp_path / "runs" / name / "seed_0" / "config.json").read_text())["config"]
        assert config["loss"]["name"] == METHODS[name].loss_name
    assert {(c["method"], c["baseline"]) for c in results["comparisons"]} >= {(m, "kd") for m in zoo}


@pytest.mark.slow
def test_the_feature_map_methods_in_one_smoke_experiment(tmp_path, capsys):
    """`smoke:conv`: tiny ResNets, so that the methods needing feature maps (at, nst, ft) run end to end next to kd
    and are compared with it; ft spends its first half epoch on the paraphraser."""
    from extkd_jax import cli
    from extkd_jax.configs.base import SPATIAL_METHODS

    assert cli.main(["reproduce", "--config=smoke:conv", f"--workdir={tmp_path}"]) == 0
    capsys.readouterr()
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["methods"]) == {"kd", *SPATIAL_METHODS}
    for name in SPATIAL_METHODS:
        assert np.isfinite(results["methods"][name]["runs"][0]["test_acc"])
    assert {(c["method"], c["baseline"]) for c in results["comparisons"]} >= {(m, "kd") for m in SPATIAL_METHODS}
    record = json.loads((tmp_path / "runs" / "ft" / "seed_0" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["train_reconstruction"] > 0 and record["train_ft"] > 0


def test_a_diverging_method_is_reported_and_the_others_go_on(tmp_path, capsys, monkeypatch):
    """Segment weights that blow the loss up within a few steps stop runs on a non-finite loss: Extended-KD's
    diverging grid value is not chosen, FitNet (both values diverge) is reported as diverged (results.json, report,
    README table, CLI summary) and the experiment finishes (exit 0: other methods have figures); a rerun of FitNet
    alone reports it again from the runs' diverged.txt without training, and exits 3: every method diverged."""
    from extkd_jax import cli
    from extkd_jax.experiment import reproduce
    from extkd_jax.experiment.report import readme_table_of

    flags = [
        "reproduce",
        "--config=smoke",
        "--config.seeds=1",
        "--config.reproduce.grid.kd=(2.0, 4.0)",
        "--config.reproduce.grid.extended_kd=(0.5, 1e12)",  # 1e12: the largest weight accepted; inf within 3 steps
        "--config.reproduce.grid.fitnet=(1e12, 5e11)",
        f"--workdir={tmp_path}",
    ]
    assert cli.main([*flags, "--config.reproduce.methods=('scratch_transfer','kd','fitnet','extended_kd')"]) == 0
    assert "fitnet (left out" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["methods"]) == ["scratch_transfer", "kd", "extended_kd"]
    ext = results["methods"]["extended_kd"]
    assert ext["chosen"] == 0.5 and [g["value"] for g in ext["grid"]] == [0.5] and len(ext["runs"]) == 1
    assert list(ext["diverged_grid"]) == ["1e+12"]
    kd_t = results["temperature"]["value"]  # KD's choice: named in the runs' paths where not the preset's (8)
    at_t = "" if kd_t == 8.0 else f"temperature={kd_t:g}/"
    assert ext["diverged_grid"]["1e+12"].startswith(
        f"selection/extended_kd/{at_t}extended_kd.weight=1e+12/seed_1: non-finite"
    )
    assert list(results["diverged"]) == ["fitnet"]
    error = results["diverged"]["fitnet"]
    assert error.startswith(f"every grid value: selection/fitnet/{at_t}fitnet.weight=1e+12/seed_1: non-finite loss")
    assert f"selection/fitnet/{at_t}fitnet.weight=5e+11/seed_1: non-finite" in error
    assert (tmp_path / f"selection/fitnet/{at_t}fitnet.weight=5e+11/seed_1/diverged.txt").read_text() in error
    assert {(c["method"], c["baseline"]) for c in results["comparisons"]} == {("extended_kd", "kd")}
    report = (tmp_path / "report.md").read_text()
    assert "- **fitnet**: diverged" in report and "no figures): fitnet." in report
    assert "| 1e+12 | diverged | - | - |  |" in report and "extended_kd.weight=1e+12 diverged: selection/" in report
    assert readme_table_of(tmp_path).splitlines()[-3] == "| fitnet | diverged | - | - | - |"

    trained = []
    monkeypatch.setattr(reproduce, "train_and_evaluate", lambda c, w, **kw: trained.append(str(w)))
    assert cli.main([*flags, "--config.reproduce.methods=('fitnet',)"]) == cli.EXIT_ALL_DIVERGED == 3
    out = capsys.readouterr()
    assert "fitnet (left out" in out.out and "every method diverged (fitnet)" in out.err
    # the teacher and KD's grid (fitnet runs at its temperature) are checked; the diverged runs are not retrained
    assert trained == [str(tmp_path / "teacher")] + [
        str(tmp_path / f"selection/kd/temperature={v}/seed_1") for v in (2, 4)
    ]
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["methods"] == {} and again["diverged"] == {"fitnet": error}
    assert "- **fitnet**: diverged" in (tmp_path / "report.md").read_text()


def test_a_diverged_curve_point_is_left_out_by_name():
    """A dark-knowledge curve point whose runs diverge is named in `diverged`; the other points stay."""
    from types import SimpleNamespace

    from extkd_jax.experiment.reproduce import RunDiverged, _curve

    config = tiny_config(
        ".", **{"seeds": 2, "reproduce.keep_fractions": (0.1, 0.5), "reproduce.curve_methods": ("kd",)}
    )
    main_runs = [SimpleNamespace(unseen_acc=0.1 * s, unseen_acc_corrected=0.2 * s, wall_time_s=1.0) for s in (1, 2)]
    methods = {"kd": SimpleNamespace(runs=main_runs, chosen=4.0)}

    def run(method, seed, knob, fraction, *rest):
        if fraction == 0.5:
            raise RunDiverged(f"curve/{method}/seed_{seed}", "non-finite loss at step 3")
        return SimpleNamespace(unseen_acc=0.5, unseen_acc_corrected=0.6, wall_time_s=2.0), None

    diverged = {}
    points = _curve(config, methods, run, diverged)
    assert [(p.method, p.keep_fraction) for p in points] == [("kd", 0.0), ("kd", 0.1)]
    assert points[0].unseen_acc_corrected.mean == pytest.approx(0.3) and points[1].wall_time_s == 4.0
    assert diverged == {"kd (keep_fraction=0.5)": "curve/kd/seed_0: non-finite loss at step 3"}


@pytest.mark.slow
def test_two_teachers_each_with_its_own_students(tmp_path):
    """reproduce.teacher_seeds=2: two teachers (their own seeds), each with its own students over the reported
    seeds; the knob is chosen once, on the first teacher; comparisons pair (teacher, seed); the primary comparison is
    also reported per teacher; a rerun reuses every run."""
    from extkd_jax import cli

    flags = [
        "reproduce",
        "--config=smoke",
        "--config.reproduce.methods=('kd','extended_kd')",
        "--config.reproduce.teacher_seeds=2",
        f"--workdir={tmp_path}",
    ]
    assert cli.main(flags) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["teachers"] == 2 and set(results["teacher"]["others"]) == {"teacher_1"}
    seeds = {json.loads((tmp_path / t / "config.json").read_text())["config"]["seed"] for t in ("teacher", "teacher_1")}
    assert seeds == {0, 1000}
    for m in results["methods"].values():
        assert sorted((r["teacher_index"], r["seed"]) for r in m["runs"]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert all(g["run"]["teacher_index"] == 0 for g in m["grid"])  # chosen once, with the first teacher
        for r in m["runs"]:
            assert ("/teacher_1/" in r["workdir"]) == (r["teacher_index"] == 1)
            student = json.loads((tmp_path / r["workdir"] / "config.json").read_text())["config"]
            assert student["teacher"]["workdir"] == str(tmp_path / ("teacher_1" if r["teacher_index"] else "teacher"))
    primary = [c for c in results["comparisons"] if c["primary"]]
    assert len(primary) == 1 and primary[0]["n"] == 4  # pooled over (teacher, seed) pairs
    per_teacher = results["primary_by_teacher"]
    assert [(c["teacher"], c["n"]) for c in per_teacher] == [(0, 2), (1, 2)]
    runs = {
        m: {(r["teacher_index"], r["seed"]): r["unseen_acc_corrected"] for r in results["methods"][m]["runs"]}
        for m in ("extended_kd", "kd")
    }
    for c in per_teacher:
        diffs = [runs["extended_kd"][(c["teacher"], s)] - runs["kd"][(c["teacher"], s)] for s in (0, 1)]
        assert c["diff_mean"] == pytest.approx(np.mean(diffs))
    report = (tmp_path / "report.md").read_text()
    assert "2 teachers, each with its own students" in report and "- teacher 1: " in report
    assert cli.main(flags) == 0
    assert json.loads((tmp_path / "results.json").read_text())["methods"] == results["methods"]
