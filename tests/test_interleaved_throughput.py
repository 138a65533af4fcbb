"""benchmarks/interleaved_throughput.py: the sides alternate which goes first, the ratio is the median of the
per-repetition ratios with its spread (checked against numpy on a fake clock), and the CPU rehearsal writes the JSON
the accelerator run will write."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.tiny import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "interleaved_throughput.py"


def _module():
    pytest.importorskip("torch")
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("interleaved_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Clock:
    def __init__(self):
        self.now, self.calls = 0.0, []

    def __call__(self) -> float:
        return self.now


class _Side:
    """A side whose repetitions take the given seconds on the fake clock, recording the order of the calls."""

    def __init__(self, name: str, clock: _Clock, seconds: list[float]):
        self.name, self.clock, self.seconds = name, clock, list(seconds)

    def rep(self) -> float:
        self.clock.calls.append(self.name)
        self.clock.now += self.seconds.pop(0)
        return 1.0


def test_interleaved_ratios_alternate_the_first_side_and_report_median_and_spread(monkeypatch):
    it = _module()
    clock = _Clock()
    monkeypatch.setattr(it.time, "perf_counter", clock)
    ours_s, theirs_s = [1.0, 1.0, 2.0, 1.0, 0.5], [2.0, 3.0, 2.0, 1.5, 4.0]
    ours, theirs = _Side("ours", clock, ours_s), _Side("theirs", clock, theirs_s)
    result = it.interleave(ours, theirs, reps=5, images_per_rep=100)
    assert clock.calls == ["ours", "theirs", "theirs", "ours", "ours", "theirs", "theirs", "ours", "ours", "theirs"]
    ratios = np.asarray(theirs_s) / np.asarray(ours_s)  # img/s ours over img/s theirs, same images per side
    assert [r["ratio"] for r in result["repetitions"]] == pytest.approx(ratios)
    assert result["ratio_median"] == pytest.approx(np.median(ratios))
    assert (result["ratio_min"], result["ratio_max"]) == pytest.approx((ratios.min(), ratios.max()))
    assert (result["ratio_q1"], result["ratio_q3"]) == pytest.approx(tuple(np.percentile(ratios, [25, 75])))
    assert result["ours_img_per_s_median"] == pytest.approx(100 / np.median(ours_s))
    assert result["theirs_img_per_s_median"] == pytest.approx(100 / np.median(theirs_s))


def test_a_non_finite_loss_stops_the_measurement_naming_the_side(monkeypatch):
    it = _module()
    clock = _Clock()
    monkeypatch.setattr(it.time, "perf_counter", clock)
    theirs = _Side("theirs", clock, [1.0])
    theirs.rep = lambda: float("nan")
    with pytest.raises(FloatingPointError, match="theirs"):
        it.interleave(_Side("ours", clock, [1.0]), theirs, reps=1, images_per_rep=10)


def test_bad_sizes_are_refused_by_name(capsys):
    it = _module()
    for flag, named in (("--reps=0", "--reps=0"), ("--teacher=resnet9", "resnet9"), ("--student=vgg8", "vgg8")):
        with pytest.raises(SystemExit):
            it.parse_args(["--cpu", flag])
        assert named in capsys.readouterr().err


@pytest.mark.slow
def test_the_cpu_rehearsal_writes_the_ratio_and_its_spread(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "interleaved.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu", "--batch-size=4", "--steps=1", "--reps=3", f"--out={out}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["settings"]["torch_mode"] == "eager_fp32" and record["host"]["platform"] == "cpu"
    rows = record["repetitions"]
    assert [r["first"] for r in rows] == ["ours", "theirs", "ours"]
    assert all(r["ours_s"] > 0 and r["theirs_s"] > 0 for r in rows)
    assert record["ratio_median"] == pytest.approx(np.median([r["theirs_s"] / r["ours_s"] for r in rows]))
    assert (
        record["ratio_min"] <= record["ratio_q1"] <= record["ratio_median"] <= record["ratio_q3"] <= record["ratio_max"]
    )
