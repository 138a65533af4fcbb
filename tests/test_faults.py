"""Preemption and faults: SIGTERM mid-run, corrupt and half-written checkpoints.

(A NaN/Inf loss is covered by tests/test_engine.py::test_nonfinite_loss_stops_with_the_step_named; a SIGKILL
mid-run by test_sigkill_mid_run_resumes_to_the_same_result.)
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from extkd_jax.train.checkpoint import Checkpointer
from extkd_jax.train.loop import train_and_evaluate
from extkd_jax.train.metrics import read_metrics
from tests.tiny import REPO_ROOT, tiny_config, tiny_setup

pytestmark = pytest.mark.fault

# runs that are later extended use a constant rate: num_epochs may change on resume only then
CONSTANT = {"optim.schedule": "constant"}

TIMING = ("epoch_time_s", "img_per_s", "wall_time_s")
STEPS_PER_EPOCH = 7  # tiny data: 400 train - 50 val = 350 examples, batch 50


def assert_same_records(expected: list[dict], actual: list[dict]) -> None:
    """Same epochs, and every non-timing value equal within 1e-6."""
    assert [r["epoch"] for r in actual] == [r["epoch"] for r in expected]
    for ra, rb in zip(expected, actual):
        assert set(ra) == set(rb), f"epoch {ra['epoch']}: keys differ"
        for k in ra:
            if k not in TIMING:
                np.testing.assert_allclose(
                    np.asarray(rb[k], float),
                    np.asarray(ra[k], float),
                    rtol=1e-6,
                    atol=1e-6,
                    err_msg=f"{k} at epoch {ra['epoch']}",
                )


# ------------------------------------------------------------------------------------------------------ SIGTERM


def _extkd(*args: str) -> list[str]:
    return [sys.executable, "-m", "extkd_jax.cli", *args]


def _wait_for_first_record(workdir: pathlib.Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if read_metrics(workdir):
                return
        except ValueError:  # a line being written
            pass
        time.sleep(0.02)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_exits_1_and_the_rerun_matches_an_uninterrupted_run(data_dir, tmp_path):
    epochs = 10
    flags = [
        f"--config={REPO_ROOT / 'tests/scripts/tiny_config.py'}",
        f"--config.data.dir={data_dir}",
        f"--config.num_epochs={epochs}",
        "--config.steps_per_dispatch=1",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    env.pop("XLA_FLAGS", None)

    def run(workdir):
        return subprocess.run(
            _extkd("train", *flags, f"--workdir={workdir}"),
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    full = run(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]

    workdir = tmp_path / "preempted"
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(
            _extkd("train", *flags, f"--workdir={workdir}"),
            env=env,
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            _wait_for_first_record(workdir, proc, timeout=240)
            assert proc.poll() is None, "the run ended before the first metrics record"
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert status == 1, stderr[-3000:]  # SystemExit("preempted ...")
    assert "Traceback" not in stderr, stderr[-3000:]
    match = re.search(r"preempted \(SIGTERM\): checkpoint at step (\d+) written in (\S+);", stderr)
    assert match, stderr[-3000:]
    assert "rerun the same command to resume" in stderr
    step = int(match.group(1))
    records = read_metrics(workdir)
    assert 1 <= len(records) < epochs
    boundary = len(records) * STEPS_PER_EPOCH  # the last completed epoch
    checkpointer = Checkpointer(workdir, keep=2)
    try:
        assert step in checkpointer.all_steps()
        assert max(checkpointer.all_steps()) == step
    finally:
        checkpointer.close()
    assert boundary <= step <= boundary + STEPS_PER_EPOCH, (step, boundary)

    resumed = run(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_records(read_metrics(tmp_path / "full"), read_metrics(workdir))


def _terminate_after_dispatch(monkeypatch, dispatch: int) -> None:
    """Makes the training loop receive a real SIGTERM right after its `dispatch`-th dispatch of steps."""
    from extkd_jax.train import data

    for name in ("make_run_steps", "make_run_batches"):  # the device-resident and the stream pipeline
        real = getattr(data, name)

        def make(*args, real=real, **kwargs):
            run = real(*args, **kwargs)
            calls = {"n": 0}

            def wrapped(*a, **k):
                out = run(*a, **k)
                calls["n"] += 1
                if calls["n"] == dispatch:
                    os.kill(os.getpid(), signal.SIGTERM)
                return out

            return wrapped

        monkeypatch.setattr(data, name, make)


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory) -> list[dict]:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    train_and_evaluate(tiny_config(data_dir, steps_per_dispatch=1), workdir, mode="train")
    return read_metrics(workdir)


@pytest.mark.parametrize("pipeline", ["device", "stream"])
@pytest.mark.parametrize("dispatch", [10, STEPS_PER_EPOCH], ids=["mid_epoch", "epoch_boundary"])
def test_sigterm_in_process_resumes_exactly(dispatch, pipeline, data_dir, tmp_path, monkeypatch, uninterrupted):
    """Killed mid-epoch or at an epoch's end and resumed, a run equals the uninterrupted one; the streamed one too
    (and it equals the device-resident one: the same batches in the same order), restored from the grain
    iterator state its checkpoint holds."""
    config = tiny_config(data_dir, steps_per_dispatch=1, **{"data.pipeline": pipeline})
    _terminate_after_dispatch(monkeypatch, dispatch)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit, match=rf"preempted \(SIGTERM\): checkpoint at step {dispatch} written"):
        train_and_evaluate(config, tmp_path / "w", mode="train")
    assert signal.getsignal(signal.SIGTERM) == handler  # the loop put the previous handler back
    checkpointer = Checkpointer(tmp_path / "w")
    try:
        assert max(checkpointer.all_steps()) == dispatch
        saved = checkpointer.restore_latest({"data": None})[1]["data"]
    finally:
        checkpointer.close()
    if pipeline == "stream":  # the iterator's position: `dispatch` batches into the epoch
        assert saved["epoch"] == (dispatch - 1) // STEPS_PER_EPOCH
        assert json.loads(saved["iterator"])["next_index"] == (dispatch - 1) % STEPS_PER_EPOCH + 1
    else:
        assert saved == {}
    monkeypatch.undo()
    train_and_evaluate(config, tmp_path / "w", mode="train")
    assert_same_records(uninterrupted, read_metrics(tmp_path / "w"))


# -------------------------------------------------------------------------------------------------- checkpoints


def _files(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _truncate_arrays(step_dir: pathlib.Path) -> None:
    for p in _files(step_dir / "state"):
        if p.parent.name == "d":  # OCDBT data files holding the arrays
            p.write_bytes(p.read_bytes()[:10])


def _overwrite_arrays(step_dir: pathlib.Path) -> None:
    rng = np.random.default_rng(0)
    for p in _files(step_dir / "state"):
        if p.parent.name == "d":
            p.write_bytes(rng.integers(0, 256, p.stat().st_size, dtype=np.uint8).tobytes())


def _empty_state_dir(step_dir: pathlib.Path) -> None:
    for p in _files(step_dir / "state"):
        p.unlink()


def _delete_meta(step_dir: pathlib.Path) -> None:
    shutil.rmtree(step_dir / "meta")


def _zero_every_file(step_dir: pathlib.Path) -> None:
    for p in _files(step_dir):
        p.write_bytes(b"")


CORRUPTIONS = {
    "truncated_arrays": _truncate_arrays,
    "overwritten_arrays": _overwrite_arrays,
    "empty_state_dir": _empty_state_dir,
    "no_meta_item": _delete_meta,
    "every_file_empty": _zero_every_file,
}


def _target(data_dir):
    """What a resumed run restores: the train state (into the shapes of a fresh one) and the meta item."""
    return {"state": tiny_setup(tiny_config(data_dir), (8, 8, 1), STEPS_PER_EPOCH).init_state(), "meta": None}


# orbax's reader threads may report a closed event loop after a failed restore: harmless
quiet_orbax = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@quiet_orbax
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_step(corruption, copy_of_finished, data_dir):
    CORRUPTIONS[corruption](copy_of_finished / "checkpoints" / "21")
    checkpointer = Checkpointer(copy_of_finished, keep=3)
    try:
        assert checkpointer.all_steps() == [7, 14, 21]
        with pytest.warns(UserWarning, match=r"checkpoint step 21 in .* could not be restored .*older one"):
            step, items = checkpointer.restore_latest(_target(data_dir))
    finally:
        checkpointer.close()
    assert step == 14 and int(items["state"].step) == 14
    assert items["meta"]["epoch"] == 2 and [r["epoch"] for r in items["meta"]["records"]] == [1, 2]


@quiet_orbax
def test_every_checkpoint_corrupt_restores_nothing(copy_of_finished, data_dir):
    for step in (7, 14, 21):
        _truncate_arrays(copy_of_finished / "checkpoints" / str(step))
    checkpointer = Checkpointer(copy_of_finished, keep=3)
    try:
        with pytest.warns(UserWarning) as record:
            assert checkpointer.restore_latest(_target(data_dir)) is None
    finally:
        checkpointer.close()
    assert _fallbacks(record) == ["21", "14", "7"]


def _restore_cleanly(workdir: pathlib.Path, data_dir) -> int:
    """The newest checkpoint's step, asserting that it restores without a fallback warning."""
    target = _target(data_dir)
    checkpointer = Checkpointer(workdir, keep=3)
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            _, items = checkpointer.restore_latest(target)
    finally:
        checkpointer.close()
    assert not _fallbacks(record)
    return int(items["state"].step)


def _fallbacks(record) -> list[str]:
    """The steps named by the restore fallback warnings in `record`, in order."""
    return [
        re.search(r"checkpoint step (\d+) in .* could not be restored", str(w.message)).group(1)
        for w in record
        if "could not be restored" in str(w.message)
    ]


@quiet_orbax
def test_training_resumes_from_the_previous_good_step(copy_of_finished, finished, data_dir, tmp_path):
    _truncate_arrays(copy_of_finished / "checkpoints" / "21")
    config = tiny_config(data_dir, keep_checkpoints=3, num_epochs=4, **CONSTANT)
    with pytest.warns(UserWarning, match="checkpoint step 21 .* could not be restored"):
        record = train_and_evaluate(config, copy_of_finished, mode="train")
    assert record["epoch"] == 4 and record["step"] == 28
    # epochs 3 and 4 were trained from step 14: the same as resuming after deleting step 21
    reference = tmp_path / "reference"
    shutil.copytree(finished, reference)
    shutil.rmtree(reference / "checkpoints" / "21")
    train_and_evaluate(config, reference, mode="train")
    assert_same_records(read_metrics(reference), read_metrics(copy_of_finished))
    assert _restore_cleanly(copy_of_finished, data_dir) == 28
    # the corrupt step 21 was rewritten, not kept: every remaining checkpoint reads
    checkpointer = Checkpointer(copy_of_finished, keep=3)
    try:
        assert checkpointer.all_steps() == [14, 21, 28]
    finally:
        checkpointer.close()
    _delete_newest(copy_of_finished)
    assert _restore_cleanly(copy_of_finished, data_dir) == 21


def _delete_newest(workdir: pathlib.Path) -> None:
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    shutil.rmtree(workdir / "checkpoints" / str(steps[-1]))


@quiet_orbax
def test_rerun_of_a_finished_run_repairs_its_corrupt_final_checkpoint(copy_of_finished, finished, data_dir):
    """The final checkpoint is what `distill` and `evaluate` load: a rerun must not leave it unreadable."""
    _overwrite_arrays(copy_of_finished / "checkpoints" / "21")
    with pytest.warns(UserWarning, match="checkpoint step 21 .* could not be restored"):
        record = train_and_evaluate(
            tiny_config(data_dir, keep_checkpoints=3, **CONSTANT), copy_of_finished, mode="train"
        )
    assert record["epoch"] == 3
    assert _restore_cleanly(copy_of_finished, data_dir) == 21
    assert_same_records(read_metrics(finished), read_metrics(copy_of_finished))


def _half_written(workdir: pathlib.Path, step: int) -> pathlib.Path:
    """What orbax leaves when killed while writing `step`: a temporary directory, partly filled, no commit."""
    tmp = workdir / "checkpoints" / f"{step}.orbax-checkpoint-tmp-1764150000123456"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(workdir / "checkpoints" / "21", tmp)
    for p in tmp.rglob("commit_success.txt"):
        p.unlink()
    (tmp / "_CHECKPOINT_METADATA").unlink()
    _truncate_arrays(tmp)
    return tmp


@quiet_orbax
def test_half_written_checkpoint_is_ignored(copy_of_finished, data_dir):
    _half_written(copy_of_finished, 28)
    checkpointer = Checkpointer(copy_of_finished, keep=3)
    try:
        assert checkpointer.all_steps() == [7, 14, 21]
    finally:
        checkpointer.close()
    _half_written(copy_of_finished, 28)  # again: the Checkpointer may have cleaned it up
    assert _restore_cleanly(copy_of_finished, data_dir) == 21
    _half_written(copy_of_finished, 28)
    # resuming for one more epoch writes step 28 itself, whatever the temporary directory held
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = train_and_evaluate(
            tiny_config(data_dir, keep_checkpoints=3, num_epochs=4, **CONSTANT), copy_of_finished, mode="train"
        )
    assert not _fallbacks(caught)
    assert record["epoch"] == 4
    assert _restore_cleanly(copy_of_finished, data_dir) == 28
    # the temporary directory is gone (the next run cleans up what a killed save left)
    assert not list((copy_of_finished / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
