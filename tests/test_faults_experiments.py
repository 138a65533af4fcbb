"""Fault injection on whole experiments (`extkd reproduce`, launch/parallel_reproduce.py): a diverged.txt that outlives
its run's finish, two launchers on one workdir, experiment names that leave the workdir or repeat, an experiment
whose every method diverged, a finished experiment on a read-only disk. Each is refused before anything is written,
or ends in the results an undisturbed run gives.

The finished experiment they start from (smoke preset, scratch_transfer and kd, one seed) is built once per module.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from extkd_jax import cli
from tests.test_parallel_reproduce import _driver
from tests.test_reliability import digest_of, read_only
from tests.tiny import REPO_ROOT

pytestmark = pytest.mark.fault

FLAGS = [
    "reproduce",
    "--config=smoke",
    "--config.seeds=1",
    "--config.reproduce.methods=('scratch_transfer','kd')",
    "--config.reproduce.grid.kd=(4.0,)",
]
LAUNCHER_METHODS = "--config.reproduce.methods=('scratch_transfer','kd')"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished experiment: its workdir, with results.json and report.md written."""
    workdir = tmp_path_factory.mktemp("finished") / "exp"
    assert cli.main([*FLAGS, f"--workdir={workdir}"]) == 0
    return workdir


@pytest.fixture
def experiment(finished, tmp_path):
    """A copy of the finished experiment that a test may change."""
    copy = tmp_path / "exp"
    shutil.copytree(finished, copy, ignore=shutil.ignore_patterns(".lock"))
    return copy


# ------------------------------------------------------------------------------------------- extkd reproduce


def test_a_run_finished_after_diverging_is_not_reported_diverged_again(experiment, capsys):
    """M2: kd's run once stopped on a non-finite loss (its diverged.txt), then finished (`on_nonfinite=skip`); the
    original command rerun reports it finished, removes the stale file, and leaves results.json as it was."""
    before = (experiment / "results.json").read_bytes()
    marker = experiment / "runs" / "kd" / "seed_0" / "diverged.txt"
    marker.write_text("runs/kd/seed_0: non-finite loss at step 3 (on_nonfinite='stop')")
    assert cli.main([*FLAGS, f"--workdir={experiment}"]) == 0
    assert "diverged" not in capsys.readouterr().out
    assert not marker.exists()
    assert (experiment / "results.json").read_bytes() == before  # the same results, not even rewritten
    assert "kd" in json.loads(before)["methods"]


def test_an_experiment_whose_every_method_diverged_exits_non_zero_with_its_report(experiment, capsys):
    """L7: every method diverges (FitNet's segment weights blow the loss up within 3 steps): the report is still
    written, naming it, and the exit status is 3 (not 0), with a message naming the method; a launcher counts that
    job finished."""
    flags = [*FLAGS[:2], "--config.seeds=1", "--config.reproduce.methods=('fitnet',)"]
    flags += ["--config.reproduce.grid.fitnet=(1e12, 5e11)", f"--workdir={experiment}"]
    rc = cli.main(flags)
    assert rc == 3 == cli.EXIT_ALL_DIVERGED
    err = capsys.readouterr().err
    assert "every method diverged (fitnet)" in err and "report.md" in err
    results = json.loads((experiment / "results.json").read_text())
    assert results["methods"] == {} and list(results["diverged"]) == ["fitnet"]
    assert "- **fitnet**: diverged" in (experiment / "report.md").read_text()
    driver = _driver()
    job = driver.Job("fitnet", "smoke", experiment, "teacher", "s", returncode=3)
    assert driver._finished(job) and not driver._finished(driver.Job("kd", "smoke", experiment, None, "s", [], 1))


def test_a_finished_experiment_on_a_read_only_disk_still_reports(experiment, capsys, monkeypatch):
    """L8: rerunning a finished experiment on a read-only disk rescores its runs and writes nothing (its outputs are
    up to date); with report.md missing it is refused by name, still writing nothing."""
    before = digest_of(experiment)
    with read_only(experiment, monkeypatch):
        assert cli.main([*FLAGS, f"--workdir={experiment}"]) == 0
    assert json.loads(capsys.readouterr().out)["report"] == f"{experiment}/report.md"
    assert digest_of(experiment) == before
    (experiment / "report.md").unlink()
    before = digest_of(experiment)
    with read_only(experiment, monkeypatch):
        assert cli.main([*FLAGS, f"--workdir={experiment}"]) == 1
    assert "is not writable: its report.md and its figures are out of date" in capsys.readouterr().err
    assert digest_of(experiment) == before


# ------------------------------------------------------------------------------ launch/parallel_reproduce.py


def _launch(workdir, *experiments: str) -> int:
    """The launcher on `workdir`, with a deadline that stops an (old, unchecked) launch within seconds."""
    flags = [f"--workdir={workdir}", "--workers=2", "--deadline=0.5"]
    return _driver().main([*flags, *(f"--experiment={e}" for e in experiments), "--", LAUNCHER_METHODS])


def test_a_second_launcher_on_a_held_workdir_is_refused(tmp_path, capsys, monkeypatch):
    """M3: while another process holds the launcher's workdir, a second launcher is refused, naming the holder,
    and writes nothing there."""
    monkeypatch.chdir(REPO_ROOT)
    workdir = tmp_path / "par"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom extkd_jax.train.lock import WorkdirLock\n"
            "with WorkdirLock(sys.argv[1], 'parallel_reproduce'):\n    print('held', flush=True)\n    time.sleep(120)",
            str(workdir),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _launch(workdir, "smoke=smoke") == 1
        assert f"is in use by pid {holder.pid}" in capsys.readouterr().err
        assert sorted(p.name for p in workdir.iterdir()) == [".lock"]  # no parts, no summary
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("name", ["..", ".", "parts", "xla_cache", "a b", "a/b", ""])
def test_an_experiment_name_that_is_not_a_plain_folder_is_refused_before_anything_is_written(
    name, tmp_path, capsys, monkeypatch
):
    """M4: `..` would put the teacher, runs and report in the parent of --workdir (another experiment's, say)."""
    monkeypatch.chdir(REPO_ROOT)
    (tmp_path / "other.txt").write_text("another experiment's file")
    before = digest_of(tmp_path)
    with pytest.raises(SystemExit):
        _launch(tmp_path / "par", f"{name}=smoke")
    assert f"--experiment='{name}=smoke': expected NAME=PRESET" in capsys.readouterr().err
    assert digest_of(tmp_path) == before and not (tmp_path / "par").exists()


def test_an_experiment_folder_holding_another_experiment_is_refused_untouched(finished, tmp_path, capsys, monkeypatch):
    """M4: W/<name> holds an experiment with other settings (one seed, not two): refused before any job starts or
    any file is copied over it."""
    monkeypatch.chdir(REPO_ROOT)
    shutil.copytree(finished, tmp_path / "par" / "exp", ignore=shutil.ignore_patterns(".lock"))
    before = digest_of(tmp_path)
    with pytest.raises(SystemExit):
        _launch(tmp_path / "par", "exp=smoke")
    err = capsys.readouterr().err
    assert "--experiment='exp=smoke'" in err and "holds a different experiment (seeds: 1 -> 2)" in err
    assert digest_of(tmp_path) == before and sorted(p.name for p in (tmp_path / "par").iterdir()) == ["exp"]


def test_an_experiment_name_given_twice_is_refused_by_name(tmp_path, capsys, monkeypatch):
    """M6: two --experiment flags with one name would share one folder, one of them dropped silently."""
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(SystemExit):
        _launch(tmp_path / "par", "a=smoke", "a=smoke:zoo")
    assert "--experiment='a=smoke:zoo': the experiment name 'a' is given twice" in capsys.readouterr().err
    assert not (tmp_path / "par").exists()
