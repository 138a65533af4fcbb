"""Metric writers: per-step scalars at the global step in TensorBoard's event files (read back with tensorboard's
own EventAccumulator) equal to scalars.jsonl and to the epoch means of metrics.jsonl; the hparams record; the resume
cut; Weights & Biases through a fake `wandb` module (what the engine calls), and the real package in its offline
mode (the test extra installs it), read back from its run file."""

from __future__ import annotations

import json
import struct
import sys
import time
import types

import numpy as np
import pytest
from etils import epath
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from extkd_jax.train import loop
from extkd_jax.train.loop import train_and_evaluate
from extkd_jax.train.metrics import MetricsLog, read_metrics
from extkd_jax.train.writers import JsonlWriter, MetricWriter, TensorBoardWriter, check_writer_names, make_writers
from tests.tiny import tiny_config

STEPS_PER_EPOCH = 7  # tests/tiny.py: 350 training examples, batches of 50


class FakeWandb:
    """What a run calls of `wandb`: init(**kwargs) -> run with log(data, step), config.update(d), finish()."""

    def __init__(self):
        self.runs = []

    def module(self) -> types.ModuleType:
        fake = types.ModuleType("wandb")
        fake.init = self.init
        return fake

    def init(self, **kwargs):
        run = types.SimpleNamespace(kwargs=kwargs, logged=[], hparams={}, finished=False)
        run.log = lambda data, step: run.logged.append((step, dict(data)))
        run.config = types.SimpleNamespace(update=lambda d, allow_val_change=False: run.hparams.update(d))
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run


def _events(logdir) -> EventAccumulator:
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_run_writes_per_step_scalars_at_the_global_step_to_every_writer(data_dir, tmp_path, monkeypatch):
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb.module())
    config = tiny_config(data_dir, num_epochs=2, steps_per_dispatch=3)
    config.metrics.writers = ("jsonl", "tensorboard", "wandb")
    config.metrics.log_every_steps = 1
    config.metrics.wandb_mode = "offline"
    workdir = tmp_path / "w"
    train_and_evaluate(config, workdir, mode="train")

    lines = _jsonl(workdir / "scalars.jsonl")
    per_step = {r["step"]: r for r in lines if "train_step/loss" in r}
    assert sorted(per_step) == list(range(1, 2 * STEPS_PER_EPOCH + 1))  # global steps, across dispatches of 3
    # the per-step losses of each epoch average to the epoch's train_loss in metrics.jsonl
    for record in read_metrics(workdir):
        steps = range(record["step"] - STEPS_PER_EPOCH + 1, record["step"] + 1)
        mean = np.mean([per_step[s]["train_step/loss"] for s in steps])
        np.testing.assert_allclose(mean, record["train_loss"], rtol=1e-6)
        assert per_step[record["step"]]["train_step/learning_rate"] == pytest.approx(record["learning_rate"])

    # TensorBoard: the same values at the same global steps; the epoch scalars at the epoch's last step
    events = _events(workdir / "tensorboard")
    loss = {e.step: e.value for e in events.Scalars("train_step/loss")}
    assert loss == pytest.approx({s: r["train_step/loss"] for s, r in per_step.items()}, rel=1e-6)
    assert "train_step/learning_rate" in events.Tags()["scalars"]
    test_acc = {e.step: e.value for e in events.Scalars("test/acc")}
    assert test_acc == pytest.approx({r["step"]: r["test_acc"] for r in read_metrics(workdir)})
    assert [e.step for e in events.Scalars("run/epoch")] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]

    # hparams: the resolved config, flattened, in hparams.json and in TensorBoard's hparams plugin
    hparams = json.loads((workdir / "hparams.json").read_text())
    assert hparams["mode"] == "train" and hparams["loss.name"] == "ce" and hparams["optim.learning_rate"] == 0.05
    assert hparams["model.kwargs.hidden_sizes"] == "[32, 32]"
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    session = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert session.hparams["loss.name"].string_value == "ce"
    assert session.hparams["optim.learning_rate"].number_value == pytest.approx(0.05)

    # W&B (a fake module): the same scalars at the same steps, the config, a run id kept in the workdir
    (run,) = wandb.runs
    assert run.kwargs["mode"] == "offline" and run.kwargs["resume"] == "allow" and run.finished
    assert run.kwargs["id"] == (workdir / "wandb_run_id").read_text().strip()
    assert run.logged == [(r["step"], {k: v for k, v in r.items() if k != "step"}) for r in lines]
    assert run.hparams["loss.name"] == "ce"


def test_writer_names_are_checked_before_anything_is_written(data_dir, tmp_path):
    config = tiny_config(data_dir, num_epochs=1)
    config.metrics.writers = ("jsonl", "tensorbord")
    with pytest.raises(ValueError, match=r"unknown writer 'tensorbord' \(did you mean 'tensorboard'\?\)"):
        train_and_evaluate(config, tmp_path / "w", mode="train")
    assert not (tmp_path / "w").exists()
    with pytest.raises(ValueError, match="named twice"):
        check_writer_names(("jsonl", "jsonl"))


def test_a_resume_drops_what_the_writers_hold_past_the_checkpoint(tmp_path):
    """Steps 1..10 written, the run resumes from step 5 and writes 6..8 again (other values): scalars.jsonl and
    TensorBoard hold 1..8, the new values from 6 on; a tag not yet rewritten loses its steps past 5 too."""
    first = make_writers(("jsonl", "tensorboard"), tmp_path)
    for step in range(1, 11):
        first.write_scalars(step, {"train_step/loss": float(step)})
    first.write_scalars(7, {"test/acc": 0.5})  # a tag the resumed run has not rewritten yet
    first.close()
    with open(tmp_path / "scalars.jsonl", "a") as f:
        f.write('{"step": 11, "train_st')  # a line torn by the kill
    resumed = make_writers(("jsonl", "tensorboard"), tmp_path, resume_step=5)
    for step in range(6, 9):
        resumed.write_scalars(step, {"train_step/loss": 100.0 + step})
    resumed.close()
    want = {s: float(s) if s <= 5 else 100.0 + s for s in range(1, 9)}
    assert {r["step"]: r["train_step/loss"] for r in _jsonl(tmp_path / "scalars.jsonl")} == want
    events = _events(tmp_path / "tensorboard")
    assert {e.step: e.value for e in events.Scalars("train_step/loss")} == want
    assert events.Scalars("test/acc") == []  # purged by the resume's SessionLog.START, not by a rewrite


def test_metrics_log_takes_any_clu_style_writer_and_waits_for_the_first_record(tmp_path):
    class Recorder:
        def __init__(self):
            self.calls = []

        def write_scalars(self, step, scalars):
            self.calls.append(("scalars", step, dict(scalars)))

        def write_hparams(self, hparams):
            self.calls.append(("hparams", dict(hparams)))

        def flush(self):
            self.calls.append(("flush",))

        def close(self):
            self.calls.append(("close",))

    recorder = Recorder()
    assert isinstance(recorder, MetricWriter)
    log = MetricsLog(tmp_path, writers=[recorder], log_every_steps=2, hparams={"loss": {"name": "kd"}})
    log.resume(0, [], step=0)
    log.write_steps(0, {"loss": np.array([1.0, 2.0, np.nan]), "kd": np.array([3.0, 4.0, 5.0])})
    assert recorder.calls == [] and not any(tmp_path.iterdir())  # nothing before the first record
    log.write_steps(3, {"loss": np.array([6.0]), "kd": np.array([7.0])})
    log.write({"epoch": 1, "step": 4, "train_loss": 2.5})
    log.close()
    assert recorder.calls == [
        ("hparams", {"loss.name": "kd"}),
        ("scalars", 2, {"train_step/loss": 2.0, "train_step/kd": 4.0}),
        ("scalars", 4, {"train_step/loss": 6.0, "train_step/kd": 7.0}),
        ("scalars", 4, {"run/epoch": 1.0, "train/loss": 2.5}),
        ("flush",),
        ("flush",),
        ("close",),
    ]


def test_a_missing_wandb_package_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'extkd_jax\[wandb\]'"):
        make_writers(("wandb",), tmp_path)


def test_a_resumed_run_logs_into_the_same_wandb_run(tmp_path, monkeypatch):
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb.module())
    make_writers(("wandb",), tmp_path).close()
    make_writers(("wandb",), tmp_path, resume_step=7).close()
    assert wandb.runs[0].kwargs["id"] == wandb.runs[1].kwargs["id"]
    assert "mode" not in wandb.runs[0].kwargs  # "" leaves wandb's own default ($WANDB_MODE)


def test_jsonl_and_tensorboard_writers_are_metric_writers(tmp_path):
    assert isinstance(JsonlWriter(tmp_path), MetricWriter)
    assert isinstance(TensorBoardWriter(tmp_path / "tb"), MetricWriter)
    assert loop.metric_settings(tiny_config(tmp_path))[:2] == (("jsonl", "tensorboard"), 50)


def _wandb_records(path) -> list[bytes]:
    """The records of a `.wandb` file: a 7-byte header (":W&B", magic, version), then LevelDB-log chunks in 32 KiB
    blocks (crc32c, little-endian length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    data, pos, out, part = path.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            out.append(part)
            part = b""
    return out


def _finished_wandb_records(path, record_type, timeout_s: float = 60.0) -> list:
    """The parsed records of a `.wandb` file once its `exit` record is there. `run.finish()` returns when wandb's
    service has handled the exit, which can be before that service has written the file out (measured: a 7-byte
    file, the header only, for up to 0.1 s after `finish()` under load), so wait for it."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = []
        try:
            for data in _wandb_records(path):
                record = record_type()
                record.ParseFromString(data)
                records.append(record)
        except Exception:  # a record caught half-written: read the file again
            if time.monotonic() > deadline:
                raise
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def test_the_wandb_writer_logs_offline_into_a_run_file_of_its_workdir(tmp_path, monkeypatch):
    """The real wandb package in its offline mode: the scalars at their steps and the hparams, read back from the
    run's `.wandb` file (the records `wandb sync` would upload)."""
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2

    monkeypatch.setenv("WANDB_SILENT", "true")
    workdir = epath.Path(tmp_path / "w")
    workdir.mkdir()
    writers = make_writers(("wandb",), workdir, settings={"wandb_mode": "offline", "wandb_project": "extkd_test"})
    writers.write_hparams({"loss.name": "kd", "optim.learning_rate": 0.1})
    for step in (1, 2, 5):
        writers.write_scalars(step, {"train_step/loss": 1.0 / step})
    writers.close()

    (run_file,) = (tmp_path / "w" / "wandb").glob("offline-run-*/run-*.wandb")
    assert run_file.name == f"run-{(workdir / 'wandb_run_id').read_text().strip()}.wandb"
    records = _finished_wandb_records(run_file, wandb_internal_pb2.Record)
    history, config = {}, {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history[items["_step"]] = items
        elif kind == "config":
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.config.update})
    assert {s: h["train_step/loss"] for s, h in history.items()} == pytest.approx({1: 1.0, 2: 0.5, 5: 0.2})
    assert config["loss.name"] == "kd" and config["optim.learning_rate"] == 0.1
