"""The training loop: owns I/O, progress, checkpoints and signals; the math lives in the jitted programs.

`train_and_evaluate(config, workdir, mode)` trains a model alone (`mode="train"`) or distills a student from a
teacher (`mode="distill"`), resuming automatically from the newest checkpoint in `workdir`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
from tqdm.auto import tqdm

from extkd_jax.data import channel_stats, default_augmentation, prepare_datasets
from extkd_jax.train import sharding
from extkd_jax.train.builders import DTYPES, load_trained_model, require_workdir
from extkd_jax.train.checkpoint import Checkpointer
from extkd_jax.train.config_checks import check_config
from extkd_jax.train.epoch import (
    DeviceDataset,
    default_steps_per_dispatch,
    make_predict,
    make_run_steps,
    steps_per_epoch as count_steps,
)
from extkd_jax.train.metrics import MetricsLog, classification_summary, read_metrics
from extkd_jax.train.program import build_program
from extkd_jax.train.state import TrainState
from extkd_jax.train.steps import make_logits_fn
from extkd_jax.train.workdir import check_or_write_config, read_config

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf with `on_nonfinite='stop'`."""


_DATASET_CACHE: dict[str, Any] = {}


def load_datasets(data_config):
    """`prepare_datasets`, memoised per data config: `reproduce` trains many runs on the same data."""
    key = json.dumps(data_config.to_dict(), sort_keys=True, default=str)
    if key not in _DATASET_CACHE:
        _DATASET_CACHE[key] = prepare_datasets(data_config)
    return _DATASET_CACHE[key]


def data_placement(data_config) -> str:
    """`auto`: each process holds only its shard when there are several processes, else replicated."""
    placement = data_config.get("placement", "auto")
    if placement == "auto":
        return "sharded" if jax.process_count() > 1 else "replicated"
    return placement


def maybe_initialize_distributed(distributed_config) -> None:
    """Starts JAX's multi-host runtime when configured (on TPU VMs the arguments are auto-detected)."""
    if not distributed_config.enabled or jax.distributed.is_initialized():
        return
    kwargs = {}
    if distributed_config.coordinator_address:
        kwargs["coordinator_address"] = distributed_config.coordinator_address
    if distributed_config.num_processes:
        kwargs["num_processes"] = int(distributed_config.num_processes)
    if distributed_config.process_id >= 0:
        kwargs["process_id"] = int(distributed_config.process_id)
    jax.distributed.initialize(**kwargs)


@contextlib.contextmanager
def _sigterm_flag():
    """Turns SIGTERM (how a TPU preemption arrives) into a flag the loop checks between dispatches."""
    flag = {"set": False}

    def handler(signum, frame):
        flag["set"] = True

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: no signal handling
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def _padded(images: np.ndarray, multiple: int) -> np.ndarray:
    extra = (-len(images)) % multiple
    return np.concatenate([images, np.zeros((extra,) + images.shape[1:], images.dtype)]) if extra else images


class Evaluator:
    """Predicts logits for whole datasets with one compiled program per model."""

    def __init__(self, logits_fn, mesh, eval_batch_size: int, mean, std, compute_dtype):
        n = mesh.devices.size
        self.batch_size = max(n, (eval_batch_size // n) * n)
        self.mesh = mesh
        self._predict = make_predict(logits_fn, mesh, self.batch_size, mean, std, compute_dtype)
        self._placed: dict[int, Any] = {}

    def logits(self, params, batch_stats, images: np.ndarray) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, 0), np.float32)
        key = id(images)
        if key not in self._placed:
            self._placed[key] = (images, sharding.put_replicated(_padded(images, self.batch_size), self.mesh))
        placed = self._placed[key][1]
        out = [
            sharding.to_host(self._predict(params, batch_stats, placed, start))
            for start in range(0, len(images), self.batch_size)
        ]
        return np.concatenate(out)[: len(images)]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, mode: str) -> dict:
    """Runs (or resumes) a `train` or `distill` run; returns the last epoch's metrics record."""
    check_config(config, mode)
    maybe_initialize_distributed(config.distributed)
    workdir = pathlib.Path(workdir)
    is_main = jax.process_index() == 0
    datasets = load_datasets(config.data)
    train_set = datasets.transfer
    mesh = sharding.make_mesh()
    sharding.check_batch_divisible(config.batch_size, mesh)
    placement = data_placement(config.data)
    steps_per_epoch = count_steps(len(train_set), config.batch_size, mesh.devices.size, placement)
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={config.batch_size} exceeds the {len(train_set)} training examples")
    compute_dtype = DTYPES[config.compute_dtype]
    mean, std = channel_stats(datasets.train)
    augment_kind = (
        default_augmentation(config.data.name) if config.data.augment == "auto" else config.data.augment
    )
    input_shape = tuple(train_set.images.shape[1:])

    teacher_parts = None
    if mode == "distill":
        teacher_parts, _ = load_trained_model(
            config.teacher.workdir, compute_dtype, expected_name=config.teacher.name
        )
        teacher_record, _ = read_config(config.teacher.workdir)
        _check_teacher_fits(config.teacher.workdir, teacher_record, datasets.num_classes, input_shape)
    program = build_program(config, datasets.num_classes, input_shape, steps_per_epoch, teacher_parts)
    # written only once every check that can refuse the run has passed: a refused start leaves nothing
    info = {
        "num_classes": datasets.num_classes,
        "input_shape": list(input_shape),
        "drop_classes": list(datasets.drop_classes),
    }
    check_or_write_config(workdir, config, kind=mode, write=is_main, info=info)
    parts, step_fn, teacher_vars = program.parts, program.step_fn, program.teacher_vars
    run_steps = make_run_steps(
        step_fn, mesh, config.batch_size, augment_kind, mean, std, compute_dtype, placement
    )
    evaluator = Evaluator(
        make_logits_fn(parts, "student"), mesh, config.eval_batch_size, mean, std, compute_dtype
    )

    state = program.init_state()
    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
    partial: dict[str, float] = {}
    restored = checkpointer.restore_latest(state)
    if restored is not None:
        state, meta = restored
        partial = meta.get("partial_sums", {})
    start_step = int(sharding.to_host(state.step))
    total_steps = steps_per_epoch * config.num_epochs
    metrics_log = MetricsLog(workdir, enabled=is_main)
    metrics_log.truncate_after(start_step // steps_per_epoch)

    state = sharding.put_replicated(state, mesh)
    teacher_vars = sharding.put_replicated(teacher_vars, mesh) if teacher_vars is not None else None
    device_data = DeviceDataset(train_set.images, train_set.labels, mesh, placement)
    seed_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    chunk = config.steps_per_dispatch or default_steps_per_dispatch(steps_per_epoch)
    last_record: dict = {}
    earlier = read_metrics(workdir) if start_step else []
    run_start = time.time() - (earlier[-1]["wall_time_s"] if earlier else 0.0)  # wall time spans resumes
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        unit="step",
        dynamic_ncols=True,
        disable=not (config.progress and is_main),
        desc=f"{mode} {config.model.name}",
    )

    with _sigterm_flag() as sigterm:
        step = start_step
        while step < total_steps:
            epoch = step // steps_per_epoch
            epoch_key = jax.random.fold_in(seed_key, epoch)
            perm = device_data.permutation(epoch_key)
            sums = dict(partial) if partial else {}
            partial = {}
            epoch_t0, images_seen = time.time(), 0
            while step < (epoch + 1) * steps_per_epoch:
                offset = step - epoch * steps_per_epoch
                num = min(chunk, steps_per_epoch - offset)
                t0 = time.time()
                state, step_metrics = run_steps(
                    state,
                    teacher_vars,
                    device_data.images,
                    device_data.labels,
                    perm,
                    epoch_key,
                    jnp.int32(offset),
                    num_steps=num,
                )
                step_metrics = sharding.to_host(step_metrics)
                _check_finite(step_metrics, step, config.on_nonfinite)
                finite = step_metrics["nonfinite"] == 0  # steps skipped by on_nonfinite='skip' are not averaged
                for k, v in step_metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(np.sum(v if k == "nonfinite" else v[finite]))
                sums["_count"] = sums.get("_count", 0.0) + int(finite.sum())
                sums["_last_lr"] = float(step_metrics["learning_rate"][-1])
                step += num
                images_seen += num * config.batch_size
                rate = num * config.batch_size / max(time.time() - t0, 1e-9)
                bar.update(num)
                bar.set_postfix(epoch=epoch + 1, loss=f"{step_metrics['loss'][-1]:.4f}", img_s=f"{rate:,.0f}")
                if step < (epoch + 1) * steps_per_epoch and _preempted(sigterm):
                    _stop(
                        checkpointer, step, state, {"partial_sums": sums, "reason": "SIGTERM"}, workdir, bar
                    )
            epoch_time = time.time() - epoch_t0
            record = _epoch_record(
                config, epoch + 1, step, sums, epoch_time, images_seen, time.time() - run_start
            )
            record.update(_evaluate_all(evaluator, state, datasets))
            metrics_log.write(record)
            last_record = record
            if (epoch + 1) % config.checkpoint_every_epochs == 0 or step == total_steps:
                checkpointer.save(step, sharding.to_host(state), {"epoch": epoch + 1})
            if step < total_steps and _preempted(sigterm):
                _stop(checkpointer, step, state, {"epoch": epoch + 1, "reason": "SIGTERM"}, workdir, bar)
    bar.close()
    checkpointer.close()
    if not last_record:  # already complete: report the stored result
        records = read_metrics(workdir)
        last_record = records[-1] if records else {}
    return last_record


def _preempted(sigterm: dict) -> bool:
    """Whether any process got SIGTERM: all processes must agree, or a checkpoint barrier would deadlock."""
    stop = bool(sigterm["set"])
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        stop = bool(np.max(multihost_utils.process_allgather(np.int32(stop))))
    return stop


def _stop(checkpointer: Checkpointer, step: int, state, meta: dict, workdir, bar) -> None:
    """Writes the preemption checkpoint (a no-op if this step is already saved) and exits."""
    checkpointer.save(step, sharding.to_host(state), meta)
    checkpointer.close()
    bar.close()
    log.warning("SIGTERM: checkpoint at step %d written; rerun the same command to resume", step)
    raise SystemExit(
        f"preempted (SIGTERM): checkpoint at step {step} written in {workdir}; rerun the same command to resume"
    )


def _check_teacher_fits(teacher_workdir, teacher_record: dict, num_classes: int, input_shape) -> None:
    """The teacher must predict the same classes from the same images as the student."""
    teacher_classes = teacher_record.get("num_classes")
    teacher_shape = tuple(teacher_record.get("input_shape") or ())
    if teacher_classes != num_classes or (teacher_shape and teacher_shape != tuple(input_shape)):
        raise ValueError(
            f"teacher.workdir={teacher_workdir} holds a model of {teacher_classes} classes on inputs "
            f"{teacher_shape}; the data has {num_classes} classes and inputs {tuple(input_shape)}"
        )


def _check_finite(step_metrics: dict, first_step: int, policy: str) -> None:
    bad = np.flatnonzero(step_metrics["nonfinite"] > 0)
    if len(bad) == 0 or policy == "skip":
        return
    i = int(bad[0])
    parts = {
        k: float(v[i]) for k, v in step_metrics.items() if k not in ("nonfinite", "learning_rate", "accuracy")
    }
    culprits = [k for k, v in parts.items() if not np.isfinite(v) and k != "loss"] or ["loss"]
    raise NonFiniteLossError(
        f"non-finite loss at step {first_step + i}: {', '.join(culprits)} = "
        f"{', '.join(str(parts[k]) for k in culprits)} (all parts: {parts}); "
        "lower the learning rate, or set on_nonfinite='skip' to skip such steps"
    )


def _epoch_record(
    config, epoch: int, step: int, sums: dict, epoch_time: float, images_seen: int, wall: float
) -> dict:
    count = max(sums.get("_count", 1.0), 1.0)
    record = {"epoch": epoch, "step": step}
    for k, v in sums.items():
        if not k.startswith("_") and k != "learning_rate":
            record[f"train_{k}"] = v / count
    record["learning_rate"] = sums.get("_last_lr")
    record["epoch_time_s"] = epoch_time
    record["img_per_s"] = images_seen / max(epoch_time, 1e-9)
    record["wall_time_s"] = wall
    return record


def _evaluate_all(evaluator: Evaluator, state: TrainState, datasets) -> dict:
    out = {}
    for split in ("val", "test"):
        ds = getattr(datasets, split)
        if len(ds) == 0:
            continue
        logits = evaluator.logits(state.params, state.batch_stats, ds.images)
        summary = classification_summary(logits, ds.labels, datasets.num_classes, datasets.drop_classes)
        for k, v in summary.items():
            out[f"{split}_{k}"] = v
    return out


def evaluate_workdir(workdir: str | pathlib.Path, config: ml_collections.ConfigDict | None = None) -> dict:
    """Evaluates the newest checkpoint of a workdir on its validation and test splits."""
    _, stored_config = read_config(require_workdir(workdir))
    config = config or stored_config
    parts, _ = load_trained_model(workdir, DTYPES[config.compute_dtype])
    datasets = prepare_datasets(config.data)
    mesh = sharding.make_mesh()
    mean, std = channel_stats(datasets.train)
    evaluator = Evaluator(
        make_logits_fn(parts), mesh, config.eval_batch_size, mean, std, DTYPES[config.compute_dtype]
    )
    params = sharding.put_replicated(parts.params, mesh)
    stats = sharding.put_replicated(parts.batch_stats, mesh)
    out = {}
    for split in ("val", "test"):
        ds = getattr(datasets, split)
        if len(ds):
            summary = classification_summary(
                evaluator.logits(params, stats, ds.images),
                ds.labels,
                datasets.num_classes,
                datasets.drop_classes,
            )
            out.update({f"{split}_{k}": v for k, v in summary.items()})
    if jax.process_index() == 0:
        (pathlib.Path(workdir) / "eval.json").write_text(json.dumps(out, indent=2))
    return out
