"""Fault injection: each failure a hostile run of the tool found, reproduced, and shown to be refused with a message
naming the bad value or file and the fix, or survived with nothing lost.

`python -m pytest -m fault` runs these and tests/test_faults.py (SIGTERM, corrupt and half-written checkpoints); the
README's reliability section quotes its count.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import json
import logging
import os
import pathlib
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from extkd_jax import cli
from extkd_jax.data import prepare_datasets
from extkd_jax.experiment.reproduce import reproduce
from extkd_jax.train import lock as lock_module
from extkd_jax.train import loop
from extkd_jax.train.checkpoint import Checkpointer
from extkd_jax.train.config_checks import ConfigError
from extkd_jax.train.evaluate import evaluate_workdir
from extkd_jax.train.lock import WorkdirLock, WorkdirLockedError
from extkd_jax.train.loop import NonFiniteLossError, train_and_evaluate
from extkd_jax.train.metrics import MetricsLog, read_metrics
from tests.tiny import REPO_ROOT, tiny_config, tiny_setup

pytestmark = pytest.mark.fault

CONSTANT = {"optim.schedule": "constant"}  # the rate of tests/conftest.py's finished run


def RERUN(data_dir):  # noqa: N802 - reads as a constant: the config of tests/conftest.py's finished run
    return tiny_config(data_dir, keep_checkpoints=3, **CONSTANT)


STEPS_PER_EPOCH = 7  # tiny data: 400 train - 50 val = 350 examples, batch 50
TIMING = ("epoch_time_s", "img_per_s", "wall_time_s")


def digest_of(folder: pathlib.Path) -> dict:
    """Every file of a folder with its SHA-256 (but `.lock`, which names its last holder): equal before and after
    means no data was written."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != ".lock"]
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


class Crash(Exception):
    """Stands for a process killed at a chosen point."""


def crash_before_epoch(monkeypatch, epoch: int) -> None:
    """Makes the loop die just before it records `epoch` (so epoch - 1 is the last checkpoint)."""

    class Crashing(MetricsLog):
        def write(self, record):
            if record["epoch"] == epoch:
                raise Crash(f"killed before epoch {epoch} was recorded")
            super().write(record)

    monkeypatch.setattr(loop, "MetricsLog", Crashing)


# -------------------------------------------------------------------------------------------------- the lock


HOLD = """
import sys, time
sys.path.insert(0, sys.argv[1])
from extkd_jax.train.lock import WorkdirLock
with WorkdirLock(sys.argv[2], "train"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_held_workdir_is_refused_naming_the_holder_and_freed_when_it_is_killed(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(REPO_ROOT), str(tmp_path / "w")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirLockedError) as err, WorkdirLock(tmp_path / "w", "distill"):
            pass
        message = str(err.value)
        assert f"pid {holder.pid}" in message and os.uname().nodename in message and "`extkd train`" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with WorkdirLock(tmp_path / "w", "train"):  # the kernel dropped the killed holder's lock
        pass


def test_a_remote_lock_refuses_a_live_holder_and_takes_over_an_abandoned_one(monkeypatch):
    from etils.epath import testing

    with testing.mock_epath():
        workdir = "gs://bucket/run"
        record = {"pid": 1, "host": "tpu-worker-0", "since": time.time(), "command": "train", "heartbeat": time.time()}
        from etils import epath

        (epath.Path(workdir) / ".lock").parent.mkdir(parents=True, exist_ok=True)
        (epath.Path(workdir) / ".lock").write_text(json.dumps(record))
        with pytest.raises(WorkdirLockedError, match="pid 1 on host tpu-worker-0"), WorkdirLock(workdir, "train"):
            pass
        record["heartbeat"] = time.time() - lock_module.STALE_S - 1  # a holder killed minutes ago
        (epath.Path(workdir) / ".lock").write_text(json.dumps(record))
        monkeypatch.setattr(lock_module.time, "sleep", lambda s: None)
        with WorkdirLock(workdir, "train"):
            held = json.loads((epath.Path(workdir) / ".lock").read_text())
            assert held["pid"] == os.getpid()
        assert not (epath.Path(workdir) / ".lock").exists()


@pytest.mark.slow
def test_a_second_run_on_a_running_workdir_is_refused_and_changes_nothing(data_dir, tmp_path):
    flags = [
        f"--config={REPO_ROOT / 'tests/scripts/tiny_config.py'}",
        f"--config.data.dir={data_dir}",
        "--config.num_epochs=60",
        "--config.steps_per_dispatch=1",
        f"--workdir={tmp_path / 'w'}",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    first = subprocess.Popen(
        [sys.executable, "-m", "extkd_jax.cli", "train", *flags], env=env, cwd=REPO_ROOT, stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 300
        while not read_metrics(tmp_path / "w") and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        config_before = (tmp_path / "w" / "config.json").read_bytes()

        def second(*extra):
            return subprocess.run(
                [sys.executable, "-m", "extkd_jax.cli", "train", *flags, *extra],
                env=env,
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=300,
            )

        same, other = second(), second("--config.optim.learning_rate=0.2")
        assert first.poll() is None, "the first run ended before the second started: lengthen it"
        assert same.returncode == 1 and f"in use by pid {first.pid}" in same.stderr, same.stderr[-2000:]
        assert other.returncode == 1 and "holds a different experiment" in other.stderr, other.stderr[-2000:]
        assert "Traceback" not in same.stderr + other.stderr
        assert (tmp_path / "w" / "config.json").read_bytes() == config_before
        assert first.wait(timeout=300) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert [r["epoch"] for r in read_metrics(tmp_path / "w")] == list(range(1, 61))


# ---------------------------------------------------------------------------------------------------- metrics


def test_a_torn_last_metrics_line_is_repaired_from_the_checkpoint(copy_of_finished, data_dir, caplog):
    path = copy_of_finished / "metrics.jsonl"
    intact = path.read_text()
    path.write_text(intact[:-40])  # the last line cut short, as on a full disk
    with caplog.at_level(logging.WARNING, logger="extkd_jax"):
        record = train_and_evaluate(
            tiny_config(data_dir, keep_checkpoints=3, **CONSTANT), copy_of_finished, mode="train"
        )
    assert "metrics.jsonl" in caplog.text and "unreadable" in caplog.text
    assert path.read_text() == intact
    assert record == json.loads(intact.splitlines()[-1])


def test_a_metrics_file_deleted_after_the_run_is_restored(copy_of_finished, data_dir, caplog):
    intact = (copy_of_finished / "metrics.jsonl").read_text()
    (copy_of_finished / "metrics.jsonl").unlink()
    with caplog.at_level(logging.WARNING, logger="extkd_jax"):
        train_and_evaluate(tiny_config(data_dir, keep_checkpoints=3, **CONSTANT), copy_of_finished, mode="train")
    assert "0 of 3 epoch records present" in caplog.text
    assert (copy_of_finished / "metrics.jsonl").read_text() == intact


def test_a_metrics_file_deleted_mid_run_loses_no_epoch(data_dir, tmp_path, monkeypatch, finished):
    class DeletedAfterEpoch1(MetricsLog):
        def write(self, record):
            super().write(record)
            if record["epoch"] == 1:
                self.path.unlink()  # someone removes the file while the run goes on

    monkeypatch.setattr(loop, "MetricsLog", DeletedAfterEpoch1)
    train_and_evaluate(tiny_config(data_dir, keep_checkpoints=3, **CONSTANT), tmp_path / "w", mode="train")
    assert without_timing(read_metrics(tmp_path / "w")) == without_timing(read_metrics(finished))


def test_a_run_killed_between_its_metrics_and_its_checkpoint_resumes_with_each_epoch_once(data_dir, tmp_path):
    config = tiny_config(data_dir, keep_checkpoints=3, **CONSTANT)
    train_and_evaluate(config, tmp_path / "w", mode="train")
    # as if killed after writing epoch 3's record but before its checkpoint: the newest checkpoint is epoch 2
    shutil.rmtree(tmp_path / "w" / "checkpoints" / str(3 * STEPS_PER_EPOCH))
    before = read_metrics(tmp_path / "w")
    train_and_evaluate(config, tmp_path / "w", mode="train")
    after = read_metrics(tmp_path / "w")
    assert [r["epoch"] for r in after] == [1, 2, 3]
    assert without_timing(after) == without_timing(before)


# ------------------------------------------------------------------------------------------ config and workdir


def test_a_truncated_config_json_is_named_with_the_fix_and_the_fix_works(copy_of_finished, data_dir):
    path = copy_of_finished / "config.json"
    path.write_text(path.read_text()[:100])
    config = tiny_config(data_dir, keep_checkpoints=3, **CONSTANT)
    with pytest.raises(ValueError) as err:
        train_and_evaluate(config, copy_of_finished, mode="train")
    assert str(path) in str(err.value) and "delete it and rerun" in str(err.value)
    path.unlink()  # the fix the message gives
    record = train_and_evaluate(config, copy_of_finished, mode="train")
    assert record["epoch"] == 3 and json.loads(path.read_text())["kind"] == "train"


def test_shrinking_num_epochs_of_a_finished_run_is_refused_and_changes_nothing(copy_of_finished, data_dir):
    before = digest_of(copy_of_finished)
    config = tiny_config(data_dir, keep_checkpoints=3, num_epochs=2, **CONSTANT)  # a constant rate may change length
    with pytest.raises(ValueError, match=r"trained to step 21 \(3 epochs\); num_epochs=2 is shorter"):
        train_and_evaluate(config, copy_of_finished, mode="train")
    assert digest_of(copy_of_finished) == before


def test_a_workdir_below_a_file_is_refused_naming_the_file(data_dir, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=f"{tmp_path / 'afile'} is a file, not a directory"):
        train_and_evaluate(tiny_config(data_dir), tmp_path / "afile" / "run", mode="train")


# ---------------------------------------------------------------------------------------------------- teacher


def _student_config(data_dir, teacher_dir, **overrides):
    return tiny_config(
        data_dir,
        **{"loss.name": "kd", "teacher.workdir": str(teacher_dir), "teacher.name": "mlp", "num_epochs": 2},
        **overrides,
    )


def test_an_unfinished_teacher_is_refused_unless_allowed(data_dir, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        crash_before_epoch(m, 2)
        with pytest.raises(Crash):
            train_and_evaluate(tiny_config(data_dir), tmp_path / "teacher", mode="train")
    with pytest.raises(ValueError, match=r"has not finished training .*epoch 1 of 3.*allow_unfinished"):
        train_and_evaluate(_student_config(data_dir, tmp_path / "teacher"), tmp_path / "s", mode="distill")
    assert not (tmp_path / "s").exists()
    allowed = _student_config(data_dir, tmp_path / "teacher", **{"teacher.allow_unfinished": True})
    train_and_evaluate(allowed, tmp_path / "s", mode="distill")
    recorded = json.loads((tmp_path / "s" / "config.json").read_text())["teacher"]
    assert recorded["finished"] is False and recorded["step"] == STEPS_PER_EPOCH


def test_a_resume_with_another_teacher_is_refused(data_dir, finished, tmp_path, monkeypatch):
    other = tmp_path / "other_teacher"
    train_and_evaluate(tiny_config(data_dir, seed=7, num_epochs=1), other, mode="train")
    with monkeypatch.context() as m:
        crash_before_epoch(m, 2)
        with pytest.raises(Crash):
            train_and_evaluate(_student_config(data_dir, finished), tmp_path / "s", mode="distill")
    recorded = json.loads((tmp_path / "s" / "config.json").read_text())["teacher"]
    assert recorded["workdir"] == str(finished) and len(recorded["variables_sha256"]) == 64
    with pytest.raises(ValueError, match=r"was distilled from the teacher in .*another model"):
        train_and_evaluate(_student_config(data_dir, other), tmp_path / "s", mode="distill")
    assert json.loads((tmp_path / "s" / "config.json").read_text())["teacher"] == recorded
    train_and_evaluate(_student_config(data_dir, finished), tmp_path / "s", mode="distill")  # the original: resumes
    assert [r["epoch"] for r in read_metrics(tmp_path / "s")] == [1, 2]


def test_teacher_kwargs_that_do_not_describe_the_checkpoint_are_refused(data_dir, finished, tmp_path):
    config = _student_config(data_dir, finished, **{"teacher.kwargs.hidden_sizes": (256, 256)})
    with pytest.raises(ValueError, match=r"hidden_sizes=\[256, 256\] \(the checkpoint has \[32, 32\]\)"):
        train_and_evaluate(config, tmp_path / "s", mode="distill")
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------------ checkpoints


def _state_target(data_dir):
    return {"state": tiny_setup(tiny_config(data_dir), (8, 8, 1), STEPS_PER_EPOCH).init_state(), "meta": None}


def _restore(workdir, data_dir):
    checkpointer = Checkpointer(workdir, keep=3)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step, items = checkpointer.restore_latest(_state_target(data_dir))
    finally:
        checkpointer.close()
    return step, items, [str(w.message) for w in caught]


def test_arrays_that_do_not_match_their_digest_fall_back_to_the_previous_checkpoint(copy_of_finished, data_dir):
    digest = copy_of_finished / "checkpoints" / "21" / "digest"
    path = digest / "metadata"
    stored = json.loads(path.read_text())
    path.write_text(json.dumps({**stored, "state": "0" * 64}))
    step, items, messages = _restore(copy_of_finished, data_dir)
    assert step == 14 and int(items["state"].step) == 14
    assert any("step 21" in m and "SHA-256 digest" in m for m in messages), messages


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("where", [0.25, 0.5, 0.75])
def test_a_flipped_byte_never_loads_silently(finished, copy_of_finished, data_dir, where):
    state_dir = copy_of_finished / "checkpoints" / "21" / "state"
    biggest = max((p for p in state_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    biggest.write_bytes(bytes(data))
    step, items, messages = _restore(copy_of_finished, data_dir)
    clean_step, clean, _ = _restore(finished, data_dir)
    if step == 21:  # the byte was not part of any array: what loads must be exactly what was saved
        assert not messages
        for a, b in zip(jax.tree.leaves(items["state"]), jax.tree.leaves(clean["state"])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    else:  # a changed array (digest) or an unreadable file: the previous checkpoint, with a warning
        assert step == 14 and any("step 21" in m for m in messages), messages


def test_evaluate_names_the_checkpoint_it_scored(copy_of_finished, caplog):
    digest = copy_of_finished / "checkpoints" / "21" / "digest"
    path = digest / "metadata"
    path.write_text(json.dumps({**json.loads(path.read_text()), "model": "0" * 64}))
    with caplog.at_level(logging.WARNING, logger="extkd_jax"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = evaluate_workdir(copy_of_finished)
    assert out["checkpoint_step"] == 14 and out["newest_checkpoint_step"] == 21
    assert "evaluating checkpoint step 14" in caplog.text
    assert json.loads((copy_of_finished / "eval.json").read_text())["checkpoint_step"] == 14


# -------------------------------------------------------------------------------------------------- fail fast


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"loss.segments": (7,)}, r"method (kd|fitnet): .*segments"),
        ({"reproduce.methods": ()}, "reproduce.methods is empty"),
        ({"reproduce.grid.kd": (4.0, -1.0)}, "method kd: loss.temperature=-1.0"),
    ],
    ids=["segment_index", "no_methods", "bad_grid_value"],
)
def test_reproduce_refuses_a_bad_value_before_any_training(overrides, message, tmp_path):
    from extkd_jax.configs import smoke

    config = smoke.get_config()
    for key, value in overrides.items():
        target = config
        *path, last = key.split(".")
        for p in path:
            target = target[p]
        target[last] = value
    with pytest.raises(ValueError, match=message):
        reproduce(config, tmp_path / "exp")
    assert not (tmp_path / "exp").exists()


# ------------------------------------------------------------------------------------------ non-finite steps


def test_a_skipped_step_keeps_the_weights_and_advances_the_schedule(data_dir):
    config = tiny_config(data_dir, on_nonfinite="skip", **{"model.kwargs.dropout": 0.0})
    setup = tiny_setup(config, (8, 8, 1), STEPS_PER_EPOCH)
    state = setup.init_state()
    step = jax.jit(setup.step_fn)
    images = jnp.full((50, 8, 8, 1), jnp.nan)
    labels = jnp.zeros((50,), jnp.int32)
    skipped, metrics = step(state, None, images, labels, jax.random.key(0))
    assert float(metrics["nonfinite"]) == 1.0
    for a, b in zip(jax.tree.leaves(skipped.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    counters = [int(x) for x in jax.tree.leaves(skipped.opt_state) if jnp.issubdtype(x.dtype, jnp.integer)]
    assert int(skipped.step) == 1 and counters and all(c == 1 for c in counters)
    # the next, finite step applies the rate it logs: the schedule's value at step 1
    finite, metrics = step(skipped, None, jnp.zeros((50, 8, 8, 1)), labels, jax.random.key(1))
    assert float(metrics["learning_rate"]) == pytest.approx(float(setup.learning_rate_fn(1)))
    assert [int(x) for x in jax.tree.leaves(finite.opt_state) if jnp.issubdtype(x.dtype, jnp.integer)] == [2] * len(
        counters
    )


def test_an_epoch_of_skipped_steps_stops_the_run(data_dir, tmp_path):
    config = tiny_config(data_dir, on_nonfinite="skip", **{"optim.learning_rate": 1e30})
    with pytest.raises(NonFiniteLossError, match="skipped every one of the 7 steps of epoch"):
        train_and_evaluate(config, tmp_path / "w", mode="train")


# ------------------------------------------------------------------------------------------ read-only workdirs


@contextlib.contextmanager
def read_only(root: pathlib.Path, monkeypatch):
    """Every write under `root` fails with EROFS, as on a read-only mount (reads work)."""
    root = str(root.resolve())

    def inside(path) -> bool:
        return os.path.abspath(os.fspath(path)).startswith(root)

    def refuse(path):
        raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))

    real_open, real_os_open = builtins.open, os.open

    def fake_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and inside(file) and any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guard(real):
        def wrapped(path, *args, **kwargs):
            if inside(path) and not (real is os.makedirs and os.path.isdir(path)):
                refuse(path)
            return real(path, *args, **kwargs)

        return wrapped

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", fake_open)
        m.setattr(os, "open", fake_os_open)
        for name in ("replace", "rename", "mkdir", "makedirs", "remove", "unlink", "rmdir"):
            m.setattr(os, name, guard(getattr(os, name)))
        m.setattr(shutil, "rmtree", guard(shutil.rmtree))
        yield


def test_a_finished_run_on_a_read_only_disk_still_reports_and_evaluates(copy_of_finished, data_dir, monkeypatch):
    before = digest_of(copy_of_finished)
    expected = read_metrics(copy_of_finished)[-1]
    with read_only(copy_of_finished, monkeypatch):
        record = train_and_evaluate(
            tiny_config(data_dir, keep_checkpoints=3, **CONSTANT), copy_of_finished, mode="train"
        )
        assert record == expected
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = evaluate_workdir(copy_of_finished)
    assert out["checkpoint_step"] == 21 and out["test_acc"] == pytest.approx(expected["test_acc"], abs=1e-9)
    assert digest_of(copy_of_finished) == before


def test_an_unfinished_run_on_a_read_only_disk_is_refused_clearly(copy_of_finished, data_dir, monkeypatch):
    before = digest_of(copy_of_finished)
    longer = tiny_config(data_dir, keep_checkpoints=3, num_epochs=4, **CONSTANT)
    with read_only(copy_of_finished, monkeypatch), pytest.raises(OSError, match="is not writable"):
        train_and_evaluate(longer, copy_of_finished, mode="train")
    assert digest_of(copy_of_finished) == before


# --------------------------------------------------------------------------------------------- config files


CONFIG_FILES = {
    "raises": ("def get_config():\n    raise RuntimeError('boom')\n", "get_config() raised RuntimeError: boom"),
    "returns_none": ("def get_config():\n    return None\n", "get_config() returned NoneType"),
    "returns_a_dict": ("def get_config():\n    return {'num_epochs': 1}\n", "get_config() returned dict"),
    "lacks_base_keys": (
        "import ml_collections\n\ndef get_config():\n    return ml_collections.ConfigDict({'num_epochs': 1})\n",
        "the config lacks keys every run needs: batch_size",
    ),
}


@pytest.mark.parametrize("name", list(CONFIG_FILES))
def test_a_bad_config_file_is_a_usage_error_naming_it(name, tmp_path, capsys):
    source, message = CONFIG_FILES[name]
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    status = cli.main(["train", f"--config={path}", f"--workdir={tmp_path / 'w'}"])
    err = capsys.readouterr().err
    assert status == 2 and message in err and str(path) in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("key", ["data.seed", "seed"])
def test_a_negative_seed_is_refused_before_anything_runs(key, data_dir, tmp_path):
    with pytest.raises(ConfigError, match=f"{key}=-1: expected a value >= 0"):
        train_and_evaluate(tiny_config(data_dir, **{key: -1}), tmp_path / "w", mode="train")
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------------------------- data files


def _empty(path: pathlib.Path) -> None:
    path.write_bytes(b"")


def _garbage(path: pathlib.Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _truncated_half(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _truncated_header(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[:30])


def _flipped_label_byte(path: pathlib.Path) -> None:
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("y_train.npy")
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<2H", data[info.header_offset + 26 : info.header_offset + 30])
    last = info.header_offset + 30 + name_len + extra_len + info.compress_size - 1
    data[last] ^= 0xFF  # the labels' last byte: the member's CRC-32 no longer matches
    path.write_bytes(bytes(data))


def _broken_directory(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    end = data.rfind(b"PK\x05\x06")  # the end-of-central-directory record
    data[end : end + 4] = b"XXXX"
    path.write_bytes(bytes(data))


DAMAGE = [_empty, _garbage, _truncated_half, _truncated_header, _flipped_label_byte, _broken_directory]


@pytest.mark.parametrize("damage", DAMAGE, ids=[d.__name__[1:] for d in DAMAGE])
def test_a_damaged_npz_file_is_named_with_the_fix(damage, data_dir, tmp_path):
    folder = tmp_path / "data" / "mnist"
    shutil.copytree(data_dir, folder)
    damage(folder / "train_1.npz")
    with pytest.raises(ValueError) as err:
        prepare_datasets(tiny_config(folder).data)
    message = str(err.value)
    assert str(folder / "train_1.npz") in message and "copy it again" in message, message


@pytest.mark.slow
def test_tfds_data_that_is_not_prepared_is_named_with_the_fix(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    config = tiny_config(
        tmp_path,
        **{"data.source": "tfds", "data.name": "mnist", "data.dir": str(tmp_path / "tfds"), "data.download": False},
    )
    with pytest.raises(FileNotFoundError, match=r"'mnist' split 'train' is not prepared .*tfds build mnist"):
        prepare_datasets(config.data)
