"""Faults of checkpoints, loaders and workdirs (issue 25): edited JSON items, missing digests, steps deleted under a
loader, unreadable steps, incomplete cards, a dead lock holder on gs://, broken workdir links, a truncated XLA cache
entry, unsynced writes, metrics.jsonl appended, and checkpoints resumed under another config."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from extkd_jax import load
from extkd_jax.train import lock as lock_module
from extkd_jax.train import workdir as workdir_module
from extkd_jax.train.checkpoint import Checkpointer
from extkd_jax.train.evaluate import restore_checkpoint
from extkd_jax.train.lock import WorkdirLock, WorkdirLockedError
from extkd_jax.train.loop import train_and_evaluate
from extkd_jax.train.metrics import MetricsLog, read_metrics
from extkd_jax.train.xla_cache import sweep_incomplete
from tests.test_faults import assert_same_records
from tests.tiny import REPO_ROOT, tiny_config

pytestmark = pytest.mark.fault

CONSTANT = {"optim.schedule": "constant"}  # the `finished` fixture's schedule
# orbax's reader threads may report a closed event loop after a failed restore: harmless
quiet_orbax = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _finished_config(data_dir, **overrides):
    return tiny_config(data_dir, keep_checkpoints=3, **CONSTANT, **overrides)


def _edit_json_item(step_dir: pathlib.Path, item: str, edit) -> None:
    path = step_dir / item / "metadata"
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))


def _messages(record) -> str:
    return "\n".join(str(w.message) for w in record)


# ------------------------------------------------------------------------------- H1: JSON items under the digest


@quiet_orbax
def test_an_edited_test_acc_in_the_newest_checkpoint_meta_is_neither_reported_nor_written(
    copy_of_finished, finished, data_dir
):
    def edit(meta):
        meta["records"][-1]["test_acc"] = 1.0 - meta["records"][-1]["test_acc"]

    _edit_json_item(copy_of_finished / "checkpoints" / "21", "meta", edit)
    with pytest.warns(UserWarning, match=r"step 21 .* could not be restored .*'meta'.*SHA-256"):
        record = train_and_evaluate(_finished_config(data_dir), copy_of_finished, mode="train")
    expected = read_metrics(finished)
    assert record["test_acc"] == pytest.approx(expected[-1]["test_acc"], abs=1e-9)
    assert_same_records(expected, read_metrics(copy_of_finished))


@quiet_orbax
def test_an_edited_normalization_in_the_card_is_not_loaded(copy_of_finished):
    original = restore_checkpoint(copy_of_finished).card["normalization"]["mean"]

    def edit(card):
        card["normalization"]["mean"][0] += 0.25

    _edit_json_item(copy_of_finished / "checkpoints" / "21", "card", edit)
    with pytest.warns(UserWarning, match=r"step 21 .*'card'.*SHA-256"):
        model = load(copy_of_finished)
    assert model.card["normalization"]["mean"] == original  # step 14's card, not the edited one
    for step in (7, 14):
        _edit_json_item(copy_of_finished / "checkpoints" / str(step), "card", edit)
    with warnings.catch_warnings(), pytest.raises(ValueError) as err:
        warnings.simplefilter("ignore")
        load(copy_of_finished)
    message = str(err.value)
    assert "unreadable or corrupt" in message and "another architecture" not in message
    assert all(f"step {s}: ChecksumError" in message for s in (21, 14, 7)), message


def test_a_metrics_file_contradicting_the_checkpoint_stops_the_run_and_is_kept(copy_of_finished, data_dir):
    path = copy_of_finished / "metrics.jsonl"
    records = read_metrics(copy_of_finished)
    records[1]["test_acc"] = 1.0 - records[1]["test_acc"]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"metrics\.jsonl and checkpoint step 21 in .* disagree on epoch 2 \(test_acc"):
        train_and_evaluate(_finished_config(data_dir), copy_of_finished, mode="train")
    assert path.read_bytes() == before


# ---------------------------------------------------------------------------------------- M1: a missing digest


@quiet_orbax
def test_a_checkpoint_without_its_digest_is_not_restored_unchecked(copy_of_finished):
    step21 = copy_of_finished / "checkpoints" / "21"
    shutil.rmtree(step21 / "digest")
    shutil.rmtree(step21 / "model")
    shutil.copytree(copy_of_finished / "checkpoints" / "7" / "model", step21 / "model")  # other, readable arrays
    with pytest.warns(UserWarning, match=r"step 21 .* no `digest` item, though its format \(2\) writes one"):
        restored = restore_checkpoint(copy_of_finished)
    assert restored.step == 14
    # a checkpoint of an older version (no format recorded, no digest) is restored, with a warning
    metadata = step21 / "_CHECKPOINT_METADATA"
    metadata.write_text(json.dumps({**json.loads(metadata.read_text()), "custom_metadata": {}}))
    with pytest.warns(UserWarning, match=r"step 21 .* has no digest \(written by an older version\).*verification"):
        assert restore_checkpoint(copy_of_finished).step == 21


# ---------------------------------------------------------------------------- M7, L5, L6: what `load` says


def _replace_steps(checkpoints: pathlib.Path) -> None:
    """What a trainer with keep_checkpoints=1 does meanwhile: writes a newer step, deletes every older one."""
    steps = [p for p in checkpoints.iterdir() if p.name.isdigit()]
    newest = max(int(p.name) for p in steps)
    shutil.copytree(checkpoints / str(newest), checkpoints / str(newest + 7))
    for p in steps:
        shutil.rmtree(p)


@quiet_orbax
def test_load_retries_when_the_trainer_deletes_the_step_it_chose(copy_of_finished, finished, monkeypatch):
    checkpoints = copy_of_finished / "checkpoints"
    original = Checkpointer.restore_latest
    calls = {"n": 0}

    def racing(self, targets, *args, **kwargs):
        if "model" in targets and calls["n"] < calls["limit"]:  # after the card was read: the step vanishes
            calls["n"] += 1
            _replace_steps(checkpoints)
        return original(self, targets, *args, **kwargs)

    calls["limit"] = 1
    monkeypatch.setattr(Checkpointer, "restore_latest", racing)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        restored = restore_checkpoint(copy_of_finished)
    assert restored.step == 28
    assert not [m for m in _messages(record).splitlines() if "step" in m]  # a step deleted meanwhile is no damage
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    np.testing.assert_array_equal(load(copy_of_finished)(images), load(finished)(images))
    calls.update(n=0, limit=100)  # a trainer faster than every attempt: named, not blamed on the card
    with pytest.raises(RuntimeError, match=r"deleted while being read, 5 times in a row"):
        restore_checkpoint(copy_of_finished)


def _truncate_model_arrays(step_dir: pathlib.Path) -> None:
    for p in (step_dir / "model").rglob("*"):
        if p.is_file() and p.parent.name == "d":  # OCDBT data files holding the arrays
            p.write_bytes(p.read_bytes()[:10])


@quiet_orbax
def test_load_of_a_workdir_whose_every_step_is_truncated_says_they_are_corrupt(copy_of_finished):
    for step in (7, 14, 21):
        _truncate_model_arrays(copy_of_finished / "checkpoints" / str(step))
    with warnings.catch_warnings(), pytest.raises(ValueError) as err:
        warnings.simplefilter("ignore")
        load(copy_of_finished)
    message = str(err.value)
    assert "unreadable or corrupt" in message and "another architecture" not in message, message
    assert all(f"step {s}:" in message for s in (21, 14, 7)), message


def test_a_card_without_normalization_names_the_key_and_the_file(copy_of_finished):
    restored = restore_checkpoint(copy_of_finished)
    card = {k: v for k, v in restored.card.items() if k != "normalization"}
    checkpointer = Checkpointer(copy_of_finished, keep=4)
    try:  # a checkpoint written by another tool, with a consistent digest
        checkpointer.save(28, {"model": restored.variables, "card": card, "meta": {}})
    finally:
        checkpointer.close()
    path = copy_of_finished / "checkpoints" / "28" / "card" / "metadata"
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} has no `normalization.mean`"):
        load(copy_of_finished)


# ----------------------------------------------------------------------------------- L9, L10: locks and links


def test_a_remote_lock_of_a_dead_pid_on_this_host_is_taken_over_at_once(monkeypatch):
    from etils import epath
    from etils.epath import testing

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(lock_module.time, "sleep", lambda s: None)
    try:
        with testing.mock_epath():
            workdir = epath.Path("gs://bucket/run")
            workdir.mkdir(parents=True, exist_ok=True)
            holder = {"host": socket.gethostname(), "since": time.time(), "command": "train", "heartbeat": time.time()}
            (workdir / ".lock").write_text(json.dumps({**holder, "pid": live.pid}))
            with pytest.raises(WorkdirLockedError, match=f"pid {live.pid} on host"), WorkdirLock(workdir, "train"):
                pass
            (workdir / ".lock").write_text(json.dumps({**holder, "pid": dead.pid}))  # SIGKILLed seconds ago
            with WorkdirLock(workdir, "train"):
                assert json.loads((workdir / ".lock").read_text())["pid"] == os.getpid()
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("link", ["dangling", "looping"])
def test_a_broken_symlink_as_workdir_is_named(link, data_dir, tmp_path):
    workdir = tmp_path / "run"
    workdir.symlink_to(tmp_path / "gone" if link == "dangling" else workdir)
    with pytest.raises(ValueError, match=rf"{re.escape(str(workdir))} is a symbolic link to .*does not exist or loops"):
        train_and_evaluate(tiny_config(data_dir), workdir, mode="train")
    assert workdir.is_symlink() and not (tmp_path / "gone").exists()


# ------------------------------------------------------------------------------------ writes and identity


def test_write_text_atomic_syncs_the_data_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.fspath(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    workdir_module.write_text_atomic(workdir_module.epath.Path(tmp_path / "f.json"), "{}")
    tmp = str(tmp_path / "f.json.tmp")
    assert events == [("fsync", tmp), ("replace", tmp), ("fsync", str(tmp_path))]
    assert (tmp_path / "f.json").read_text() == "{}"


def test_metrics_jsonl_is_appended_each_epoch_and_a_damaged_file_is_still_repaired(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    log = MetricsLog(tmp_path)
    log._tensorboard_missing = True  # metrics.jsonl alone: TensorBoard's writer syncs its own files
    log.resume(0, [])
    records = [{"epoch": e, "test_acc": e / 10} for e in range(1, 5)]
    log.write(records[0])
    path = tmp_path / "metrics.jsonl"
    os.link(path, tmp_path / "alias")  # a second name of the same file: sees appends, not a replacing rename
    synced.clear()
    log.write(records[1])
    log.write(records[2])
    assert (tmp_path / "alias").read_bytes() == path.read_bytes()  # appended in place, not rewritten
    assert len(synced) == 2  # each record fsync'ed
    assert read_metrics(tmp_path) == records[:3]
    path.write_bytes(path.read_bytes()[:-7])  # cut short by something else mid-run: the whole file is rewritten
    log.write(records[3])
    assert read_metrics(tmp_path) == records
    log.close()
    resumed = MetricsLog(tmp_path)
    path.write_text(path.read_text() + '{"epoch": 5, "te')  # a torn line: repaired from the checkpoint's copy
    resumed.resume(4, records)
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in records)


def test_another_config_after_deleting_config_json_is_refused_naming_both(copy_of_finished, data_dir):
    (copy_of_finished / "config.json").unlink()  # the documented fix for a damaged config.json
    before = (copy_of_finished / "metrics.jsonl").read_bytes()
    with pytest.raises(ValueError) as err:
        train_and_evaluate(_finished_config(data_dir, **{"optim.learning_rate": 0.2}), copy_of_finished, mode="train")
    message = str(err.value)
    assert f"checkpoint step 21 in {copy_of_finished / 'checkpoints'}" in message, message
    assert "optim.learning_rate: 0.05 -> 0.2" in message, message
    assert not (copy_of_finished / "config.json").exists()
    assert (copy_of_finished / "metrics.jsonl").read_bytes() == before
    # the same config resumes (the documented fix still works)
    record = train_and_evaluate(_finished_config(data_dir), copy_of_finished, mode="train")
    assert record["epoch"] == 3 and (copy_of_finished / "config.json").exists()


# ------------------------------------------------------------------------------------------- the XLA cache

_COMPILE = """
import sys
import jax
import jax.numpy as jnp
if sys.argv[1] == "extkd":  # what every `extkd` command does first
    from extkd_jax.cli import _enable_compilation_cache
    _enable_compilation_cache()
else:
    jax.config.update("jax_compilation_cache_dir", sys.argv[2])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
print(float(jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)(jnp.arange(5.0)).sum()))
"""


@pytest.mark.slow
def test_a_truncated_xla_cache_entry_is_swept_before_jax_reads_it(tmp_path):
    """JAX 0.10 writes cache entries in place, so a kill mid-write leaves a truncated one that it never replaces."""
    cache = tmp_path / "xla"
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache), PYTHONPATH=str(REPO_ROOT))

    def compile_once(how: str) -> subprocess.CompletedProcess:
        out = subprocess.run(
            [sys.executable, "-c", _COMPILE, how, str(cache)], env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return out

    first = compile_once("jax")
    entries = sorted(cache.glob("*-cache"))
    assert entries
    for entry in entries:  # what a SIGKILL during `write_bytes` leaves
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    damaged = compile_once("jax")
    assert "Error reading persistent compilation cache entry" in damaged.stderr  # and JAX keeps the entry
    assert damaged.stdout == first.stdout
    swept = compile_once("extkd")
    assert "Error reading persistent compilation cache entry" not in swept.stderr, swept.stderr[-2000:]
    assert swept.stdout == first.stdout
    assert sorted(cache.glob("*-cache")) == entries  # written again, whole
    assert sweep_incomplete(str(cache)) == [] and (cache / ".extkd_swept").exists()
    for entry in entries:  # the sweep's marker: an entry older than the last sweep is not read again
        os.utime(entry, (0, 0))
        entry.write_bytes(b"")
        os.utime(entry, (0, 0))
    assert sweep_incomplete(str(cache)) == []
