"""launch/parallel_reproduce.py: an experiment run as one process per method gives the serial run's results; a
deadline leaves unfinished methods out of the report, named; bad arguments are refused by name."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.tiny import REPO_ROOT

METHODS = "--config.reproduce.methods=('scratch_transfer','kd')"


def _driver():
    spec = importlib.util.spec_from_file_location("parallel_reproduce", REPO_ROOT / "launch" / "parallel_reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _per_run(results: dict) -> dict:
    return {
        (name, run["seed"], run.get("teacher_index", 0)): (run["test_acc"], run["unseen_acc_corrected"])
        for name, method in results["methods"].items()
        for run in method["runs"]
    }


@pytest.mark.slow
def test_parallel_runs_give_the_serial_results(tmp_path, monkeypatch):
    from extkd_jax.cli import main

    monkeypatch.chdir(REPO_ROOT)
    rc = _driver().main([f"--workdir={tmp_path / 'par'}", "--workers=2", "--experiment=smoke=smoke", "--", METHODS])
    assert rc == 0
    summary = json.loads((tmp_path / "par" / "parallel_summary.json").read_text())
    assert summary["reports"]["smoke"]["left_out"] == [] and summary["reports"]["smoke"]["exit"] == 0
    assert {job["method"] for job in summary["jobs"].values()} == {"scratch_transfer", "kd"}
    assert main(["reproduce", "--config=smoke", METHODS, f"--workdir={tmp_path / 'serial'}"]) == 0
    parallel = json.loads((tmp_path / "par" / "smoke" / "results.json").read_text())
    serial = json.loads((tmp_path / "serial" / "results.json").read_text())
    assert _per_run(parallel) == _per_run(serial) and len(_per_run(serial)) == 4  # 2 methods x 2 seeds
    assert parallel["methods"]["kd"]["chosen"] == serial["methods"]["kd"]["chosen"]


@pytest.mark.slow
def test_methods_at_kds_temperature_reuse_the_kd_jobs_selection_runs(tmp_path, monkeypatch):
    """extended_kd runs at KD's chosen temperature: its job starts once the kd job has trained KD's grid, with a
    copy of those runs, and trains none of them again; the results equal the serial experiment's."""
    from extkd_jax.cli import main

    monkeypatch.chdir(REPO_ROOT)
    methods = "--config.reproduce.methods=('kd','extended_kd')"
    rc = _driver().main([f"--workdir={tmp_path / 'par'}", "--workers=2", "--experiment=smoke=smoke", "--", methods])
    assert rc == 0
    parts = {p.name.split("-")[0]: p for p in (tmp_path / "par" / "parts").iterdir()}
    ours, theirs = (sorted((parts[m] / "selection" / "kd").glob("*/*/metrics.jsonl")) for m in ("extended_kd", "kd"))
    assert len(ours) == len(theirs) == 2  # KD's grid (4, 8) at the selection seed
    # byte-identical, wall times included: copied from the kd job and reused, not trained a second time
    assert [f.read_bytes() for f in ours] == [f.read_bytes() for f in theirs]
    assert main(["reproduce", "--config=smoke", methods, f"--workdir={tmp_path / 'serial'}"]) == 0
    parallel = json.loads((tmp_path / "par" / "smoke" / "results.json").read_text())
    serial = json.loads((tmp_path / "serial" / "results.json").read_text())
    assert _per_run(parallel) == _per_run(serial) and len(_per_run(serial)) == 4
    assert parallel["temperature"] == serial["temperature"] and parallel["temperature"]["methods"] == ["extended_kd"]


@pytest.mark.slow
def test_every_teacher_is_trained_once_and_copied_to_the_other_jobs(tmp_path, monkeypatch):
    """With two teachers, one job trains both; every other job (the scratch student's too) starts with copies of
    them, byte-identical (wall times included), and the results equal the serial experiment's."""
    from extkd_jax.cli import main

    monkeypatch.chdir(REPO_ROOT)
    teachers = "--config.reproduce.teacher_seeds=2"
    rc = _driver().main(
        [f"--workdir={tmp_path / 'par'}", "--workers=2", "--experiment=smoke=smoke", "--", METHODS, teachers]
    )
    assert rc == 0
    parts = sorted((tmp_path / "par" / "parts").iterdir())
    assert len(parts) == 2
    for run in ("teacher", "teacher_1"):
        logs = [(part / run / "metrics.jsonl").read_bytes() for part in parts]
        assert logs[0] and logs[0] == logs[1], run
    assert main(["reproduce", "--config=smoke", METHODS, teachers, f"--workdir={tmp_path / 'serial'}"]) == 0
    parallel = json.loads((tmp_path / "par" / "smoke" / "results.json").read_text())
    serial = json.loads((tmp_path / "serial" / "results.json").read_text())
    assert _per_run(parallel) == _per_run(serial) and len(_per_run(serial)) == 6  # scratch: 2 seeds; kd: 2 x 2 teachers


@pytest.mark.slow
def test_a_deadline_leaves_unfinished_methods_out_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    rc = _driver().main(
        [f"--workdir={tmp_path}", "--workers=2", "--deadline=0.5", "--experiment=smoke=smoke", "--", METHODS]
    )
    summary = json.loads((tmp_path / "parallel_summary.json").read_text())
    assert rc != 0 and summary["reports"]["smoke"]["left_out"] == ["scratch_transfer", "kd"]
    assert all(job["exit"] != 0 for job in summary["jobs"].values())


def test_bad_arguments_are_refused_by_name(tmp_path, capsys):
    driver = _driver()
    with pytest.raises(SystemExit):
        driver.main([f"--workdir={tmp_path}", "--workers=0", "--experiment=a=smoke"])
    assert "--workers=0: expected at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        driver.main([f"--workdir={tmp_path}", "--experiment=smoke"])
    assert "expected NAME=PRESET" in capsys.readouterr().err
