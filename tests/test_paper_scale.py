"""benchmarks/paper_scale.py rehearsed on CPU (`--cpu`: the preset's `mini` sizes on a synthetic CIFAR-shaped set),
so the accelerator call is never the command's first run: the phases, the shared teacher, the report, the teacher
carried into the `two` variant's call, and a phase cut by its time limit with the report still written, naming what
was left out."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from tests.tiny import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "paper_scale.py"
MINI = ["--cpu", "--seeds=1", "--no-grid", "--workers=3"]


def _run(out, *flags: str) -> tuple[int, dict, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS", "OUT")}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *MINI, f"--out={out}", *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert (out / "paper_scale.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.returncode, json.loads((out / "paper_scale.json").read_text()), (out / "report.md").read_text()


def _module():
    spec = importlib.util.spec_from_file_location("paper_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_rehearsal_shares_one_teacher_and_carries_it_into_the_two_variant(tmp_path):
    methods = ("kd", "extended_kd")
    rc, record, report = _run(tmp_path / "drop", f"--methods={','.join(methods)}", "--budget=300", "--grid=kd=2")
    log = (tmp_path / "drop" / "paper_scale.log").read_text()
    assert rc == 0, log[-3000:]
    assert {name: phase["status"] for name, phase in record["phases"].items()} == {
        "teacher": "ok",
        "students": "ok",
        "report": "ok",
    }
    assert sorted(record["methods"]["reported"]) == sorted(methods) and record["methods"]["left_out"] == {}
    assert all(r["seeds"] == 1 for r in record["methods"]["reported"].values())
    results = json.loads((tmp_path / "drop" / "results.json").read_text())
    assert results["methods"]["kd"]["chosen"] == 2.0  # --grid's one value (the preset's T is 4), no selection runs
    assert results["methods"]["kd"]["grid"] == [] == results["methods"]["extended_kd"]["grid"]
    files = sorted(p.name for p in (tmp_path / "drop").iterdir())
    assert len(files) <= 8 and {"results.json", "report.md", "teacher.tgz", "cifar10_drop_mini.tgz"} <= set(files)
    assert results["drop_classes"] == [3] and results["hardware"]["platform"] == "cpu"
    assert results["teacher"]["test_acc"] > 0.3  # the synthetic set is learnable: a trained teacher, not chance
    # every student used the teacher of the teacher phase (the one packed in teacher.tgz), none trained its own
    with tarfile.open(tmp_path / "drop" / "teacher.tgz") as tar:
        names = tar.getnames()
        metrics = [json.loads(line) for line in tar.extractfile("teacher/metrics.jsonl").read().decode().splitlines()]
    assert "teacher/config.json" in names
    assert len({n.split("/")[2] for n in names if n.startswith("teacher/checkpoints/")}) == 1  # the last step only
    assert results["teacher"]["wall_time_s"] == pytest.approx(metrics[-1]["wall_time_s"])
    assert "| teacher | ok |" in report and "Left out: none." in report and "# Dark-knowledge experiment" in report

    # the `two` call: the same teacher carried (it trains on every class), cat and dog dropped
    teacher = tmp_path / "drop" / "teacher.tgz"
    rc, record, report = _run(
        tmp_path / "two", f"--teacher={teacher}", "--variant=two", "--methods=scratch_transfer", "--mps"
    )
    assert rc == 0, (tmp_path / "two" / "paper_scale.log").read_text()[-3000:]
    assert record["phases"]["teacher"]["status"].startswith("carried from")
    assert record["phases"]["mps"]["status"].startswith("off: ")  # no MPS on a CPU machine: the students run without
    assert list(record["methods"]["reported"]) == ["scratch_transfer"]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["drop_classes"] == [3, 5] and two["teacher"]["test_acc"] == results["teacher"]["test_acc"]
    assert "teacher.tgz" not in {p.name for p in (tmp_path / "two").iterdir()}  # carried, not sent back again


@pytest.mark.slow
def test_a_phase_cut_by_its_limit_still_writes_the_report_naming_what_was_left_out(tmp_path):
    rc, record, report = _run(tmp_path, "--methods=scratch_full,kd", "--teacher-budget=2")
    assert rc == 1  # nothing reported
    assert record["phases"]["teacher"]["status"] == "timed out after 2s"
    assert record["phases"]["students"]["status"] == "skipped: no teacher"
    assert record["methods"]["reported"] == {}
    assert set(record["methods"]["left_out"]) == {"scratch_full", "kd"}
    assert all("timed out after 2s" in why for why in record["methods"]["left_out"].values())
    assert "Left out: **scratch_full** (no teacher" in report and "**kd** (no teacher" in report
    assert not (tmp_path / "results.json").exists()


def test_left_out_methods_are_named_with_their_job_s_fate(tmp_path):
    ps = _module()
    args = ps.parse_args(["--cpu", "--methods=kd,fitnet,extended_kd", f"--out={tmp_path}"])
    call = ps.Call(args, tmp_path)
    summary = {
        "jobs": {
            "kd-1": {"method": "kd", "exit": 0, "seconds": 10.0},
            "fitnet-1": {"method": "fitnet", "exit": -9, "seconds": 95.0},
            "extended_kd-1": {"method": "extended_kd", "exit": 1, "seconds": 4.0},
        }
    }
    results = {"methods": {"kd": {"runs": [{"test_acc_corrected": 0.5, "unseen_acc_corrected": 0.2}] * 2}}}
    got = ps.methods_report(args, call, tmp_path, summary, results)
    assert got["reported"] == {"kd": {"test_acc_corrected": 0.5, "unseen_acc_corrected": 0.2, "seeds": 2}}
    assert got["left_out"] == {
        "fitnet": "stopped at the students' deadline after 95s",
        "extended_kd": "its job exited 1 after 4s (part_logs.tgz)",
    }
    assert ps.methods_report(args, call, None, None, None)["left_out"]["kd"].startswith("no teacher")


def test_bad_arguments_are_refused_by_name(tmp_path, capsys):
    ps = _module()
    for flag, named in (
        ("--seeds=0", "--seeds=0"),
        (f"--teacher={tmp_path / 'missing.tgz'}", "missing.tgz"),
        ("--methods= , ", "--methods"),
    ):
        with pytest.raises(SystemExit):
            ps.parse_args([flag])
        assert named in capsys.readouterr().err


def test_the_carried_pieces_read_as_the_original_training_set(tmp_path):
    """benchmarks/carry_data.py's parts (LZMA npz members) concatenate, through the npz source, to the original."""
    from extkd_jax.data.sources import NpzSplit
    from tests.tiny import write_tiny_npz

    spec = importlib.util.spec_from_file_location("carry_data", REPO_ROOT / "benchmarks" / "carry_data.py")
    carry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(carry)
    src = write_tiny_npz(tmp_path / "src" / "cifar10", n_train=50, n_test=10, size=32, channels=3)
    written = carry.split_train(src, tmp_path / "out" / "cifar10", sizes=(20, 20, 10))
    assert [p.name for p in written] == ["train_0.npz", "train_1.npz", "train_2.npz"]
    (tmp_path / "out" / "cifar10" / "test.npz").write_bytes((src / "test.npz").read_bytes())
    original, pieces = NpzSplit("cifar10", "train", tmp_path / "src"), NpzSplit("cifar10", "train", tmp_path / "out")
    every = np.arange(50)
    assert np.array_equal(pieces.read(every), original.read(every))
    assert np.array_equal(pieces.labels, original.labels)
    with pytest.raises(ValueError, match="add up to 49"):
        carry.split_train(src, tmp_path / "bad", sizes=(20, 20, 9))
