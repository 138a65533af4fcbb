"""`extkd reproduce` end to end on the smoke preset, and the bias correction against brute force."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from extkd_jax.experiment import bias_correction as bc
from extkd_jax.experiment.report import parse_main_table
from tests.tiny import REPO_ROOT


def _brute_force_frequency_shift(logits, target, classes, grid):
    """The grid shift whose predicted fraction of `classes` is closest to `target` (independent of bisection)."""
    best, best_err = None, np.inf
    for b in grid:
        z = logits.copy()
        z[:, classes] += b
        err = abs(np.isin(z.argmax(1), classes).mean() - target)
        if err < best_err - 1e-12:
            best, best_err = b, err
    return best, best_err


def test_frequency_matching_shift_matches_brute_force():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 6)) * 3
    logits[:, 2] -= 6.0  # class 2 under-predicted, as after distillation without it
    target = 0.2
    shift = bc.shift_to_match_frequency(logits, target, [2])
    achieved = bc.predicted_fraction(bc.shift_logits(logits, [2], shift), [2])
    _, best_err = _brute_force_frequency_shift(logits, target, [2], np.linspace(-20, 40, 6001))
    assert abs(achieved - target) <= best_err + 1e-9
    assert shift > 0
    # the shift moves only the chosen class's logits
    shifted = bc.shift_logits(logits, [2], shift)
    np.testing.assert_array_equal(np.delete(shifted, 2, axis=1), np.delete(logits, 2, axis=1))


def test_validation_shift_maximises_accuracy():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=400)
    logits = rng.normal(size=(400, 4))
    logits[np.arange(400), labels] += 2.0
    logits[:, 1] -= 5.0
    shift = bc.shift_maximizing_accuracy(logits, labels, [1])
    grid = np.linspace(-20, 40, 601)
    accs = [(bc.shift_logits(logits, [1], b).argmax(1) == labels).mean() for b in grid]
    assert (bc.shift_logits(logits, [1], shift).argmax(1) == labels).mean() == pytest.approx(max(accs))
    assert 3.0 < shift < 7.5


def test_no_dropped_classes_means_no_shift():
    logits = np.zeros((3, 4))
    assert bc.shift_to_match_frequency(logits, 0.5, []) == 0.0
    assert bc.shift_maximizing_accuracy(logits, np.zeros(3, int), []) == 0.0


@pytest.mark.slow
def test_reproduce_smoke_preset_through_the_cli(tmp_path):
    workdir = tmp_path / "smoke"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "extkd_jax.cli", "reproduce", "--config=configs/smoke.py",
                          f"--workdir={workdir}"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    results = json.loads((workdir / "results.json").read_text())
    report = (workdir / "report.md").read_text()
    methods = ("scratch_full", "scratch_transfer", "kd", "fitnet", "extended_kd")
    assert tuple(results["methods"]) == methods
    assert results["drop_classes"] == [3]
    assert 0.0 <= results["teacher"]["test_acc"] <= 1.0
    table = parse_main_table(report)
    assert set(table) == set(methods)
    columns = {"test_acc": "test acc (%)", "seen_acc": "seen acc (%)", "unseen_acc": "unseen acc (%)",
               "test_acc_corrected": "test acc corrected (%)",
               "unseen_acc_corrected": "unseen acc corrected (%)"}
    for method, entry in results["methods"].items():
        for key in ("test_acc", "seen_acc", "unseen_acc", "test_acc_corrected", "unseen_acc_corrected",
                    "bias_shift"):
            stat = entry[key]
            assert len(stat["runs"]) == 2  # smoke preset: 2 seeds
            assert stat["mean"] == pytest.approx(np.mean(stat["runs"]))
            assert stat["std"] == pytest.approx(np.std(stat["runs"]))
            if key != "bias_shift":
                assert all(0.0 <= r <= 1.0 for r in stat["runs"])
                shown = table[method][columns[key]].split("±")
                assert float(shown[0]) == pytest.approx(round(stat["mean"] * 100, 1), abs=0.051)
                assert float(shown[1]) == pytest.approx(round(stat["std"] * 100, 1), abs=0.051)
    # scratch_transfer never saw a 3 and cannot predict one before the correction
    assert results["methods"]["scratch_transfer"]["unseen_acc"]["mean"] == 0.0
    # the segment weight was chosen from the grid on the validation split
    for method in ("fitnet", "extended_kd"):
        grid = results["grid"][method]
        assert grid["chosen"] in grid["weights"] and len(grid["scores"]) == len(grid["weights"])
        assert grid["chosen"] == grid["weights"][int(np.nanargmax(grid["scores"]))]
        assert results["methods"][method]["segment_weight"] == grid["chosen"]
    for png in ("per_class_accuracy.png", "training_curves.png", "confusion_extended_kd.png",
                "unseen_accuracy.png"):
        path = workdir / png
        assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert png in report
    for name in ("reproduce.json", "teacher.json", "kd.json", "extended_kd.json"):
        assert (workdir / "configs" / name).exists()
    # a second run reuses every finished run and gives the same results
    again = subprocess.run([sys.executable, "-m", "extkd_jax.cli", "reproduce", "--config=configs/smoke.py",
                            f"--workdir={workdir}"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    rerun = json.loads((workdir / "results.json").read_text())
    for method in methods:
        assert rerun["methods"][method]["test_acc"] == results["methods"][method]["test_acc"]
