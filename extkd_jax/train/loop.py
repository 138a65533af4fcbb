"""The training loop: owns I/O, progress, checkpoints and preemption; the math lives in the jitted programs.

`train_and_evaluate(config, workdir, mode)` trains a model alone (`mode="train"`) or distils a student from a
teacher (`mode="distill"`), resuming automatically from the newest checkpoint in `workdir` (local or gs://).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time

import jax
import ml_collections
import numpy as np
from etils import epath

from extkd_jax.data import Datasets
from extkd_jax.train import sharding
from extkd_jax.train.checkpoint import Checkpointer
from extkd_jax.train.config_checks import check_config, divergence_hint
from extkd_jax.train.data import Batches, data_placement, eval_splits, run_data
from extkd_jax.train.epoch import default_steps_per_dispatch
from extkd_jax.train.evaluate import Predictor, model_card
from extkd_jax.train.lock import WorkdirLock
from extkd_jax.train.metrics import MetricsLog, classification_summary
from extkd_jax.train.progress import Progress
from extkd_jax.train.setup import build, model_variables
from extkd_jax.train.teacher import check_same_teacher, load_teacher
from extkd_jax.train.workdir import check_checkpoint_record, check_or_write_config, config_to_dict, stored_record
from extkd_jax.train.writers import metric_settings

log = logging.getLogger(__name__)

# The training randomness (permutations, augmentation, dropout) is `fold_in(key(seed), TRAIN_STREAM)`: a stream of
# its own, apart from the parameter initialisation that `seed` also drives.
TRAIN_STREAM = 1


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf with `on_nonfinite='stop'`."""


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


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | epath.PathLike, mode: str, datasets: Datasets | None = None
) -> dict:
    """Runs (or resumes) a `train` or `distill` run; returns the last epoch's metrics record.

    `datasets` (optional) are the prepared splits of `config.data`, for callers that run many trainings.
    """
    check_config(config, mode)
    metric_settings(config)  # an unknown writer is refused before anything is written
    maybe_initialize_distributed(config.distributed)
    workdir = epath.Path(workdir)
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh()
    sharding.check_batch_divisible(config.batch_size, mesh)
    placement = data_placement(config.data)
    data = run_data(config, mesh, placement, datasets)
    num_steps = data.steps_per_epoch
    if num_steps == 0:
        raise ValueError(f"batch_size={config.batch_size} exceeds the {data.transfer_size} training examples")
    teacher, identity = None, None
    if mode == "distill":
        teacher, identity = load_teacher(config, data.num_classes, data.input_shape, config.compute_dtype)
    labels = data.datasets.transfer.labels if data.pipeline == "device" and placement != "sharded" else None
    setup = build(config, data.num_classes, data.input_shape, num_steps, data.mean, data.std, teacher, labels)
    card = model_card(config, data.num_classes, data.input_shape, data.mean, data.std, data.plan.class_names)
    info = {
        "num_classes": data.num_classes,
        "input_shape": list(data.input_shape),
        "drop_classes": list(data.plan.drop_classes),
        "pipeline": data.pipeline,
        **({"teacher": identity} if identity else {}),
    }
    # every check that can refuse the run passes before anything is written: a refused start leaves nothing
    check_or_write_config(workdir, config, kind=mode, write=False, info=info)
    with WorkdirLock(workdir, mode, enabled=is_main) as lock:
        if identity:
            check_same_teacher((stored_record(workdir) or {}).get("teacher"), identity, workdir)
        return _train(config, workdir, mode, info, lock.read_only, data, setup, card, mesh, placement)


def _train(config, workdir, mode, info, read_only, data, setup, card, mesh, placement) -> dict:
    """The loop proper, with the workdir held: restore, train the remaining epochs, evaluate, checkpoint."""
    is_main = jax.process_index() == 0
    num_steps = data.steps_per_epoch
    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints, create=not read_only)
    state, partial, data_state, history = setup.init_state(), {}, None, None
    run = {"kind": mode, "config": config_to_dict(config), **info}  # recorded in each checkpoint's meta
    restored = checkpointer.restore_latest({"state": state, "meta": None, "data": None}, optional=("data",))
    where = "the checkpoint"
    if restored is not None:
        state, meta, data_state = restored[1]["state"], restored[1]["meta"], restored[1]["data"] or None
        partial, history = meta.get("partial_sums", {}), meta.get("records")
        where = f"checkpoint step {restored[0]} in {checkpointer.directory}"
        check_checkpoint_record(meta.get("run"), run, where)
    start_step = int(sharding.to_host(state.step))
    total_steps = num_steps * config.num_epochs
    if start_step > total_steps:
        raise ValueError(
            f"{workdir} holds a run trained to step {start_step} ({start_step // num_steps} epochs); "
            f"num_epochs={config.num_epochs} is shorter. Use num_epochs >= {start_step // num_steps} to read or "
            "extend it, or another --workdir for a shorter run"
        )
    writers, log_every_steps, metric_config = metric_settings(config)
    metrics_log = MetricsLog(
        workdir,
        enabled=is_main and not read_only,
        writers=writers,
        log_every_steps=log_every_steps,
        hparams={"mode": mode, **run["config"]},
        settings=metric_config,
    )
    metrics_log.resume(start_step // num_steps, history, where, step=start_step)
    complete = start_step == total_steps and bool(metrics_log.records)
    if read_only and not complete:
        raise OSError(f"workdir {workdir} is not writable: a run with epochs left writes its checkpoints there")
    check_or_write_config(workdir, config, kind=mode, write=is_main and not read_only, info=info)
    if complete:  # report the stored result
        checkpointer.close()
        return metrics_log.records[-1]

    batches = Batches(data, setup.step_fn, mesh, config, placement)
    predictor = Predictor(setup.model, mesh, config.eval_batch_size)
    evaluations = eval_splits(data, config, predictor)
    state = sharding.put_replicated(state, mesh)
    teacher_variables = None if setup.teacher is None else sharding.put_replicated(setup.teacher_variables, mesh)
    seed_key = jax.random.fold_in(jax.random.key(config.seed), TRAIN_STREAM)
    chunk = config.steps_per_dispatch or default_steps_per_dispatch(num_steps, data.pipeline)
    earlier = metrics_log.records
    run_start = time.time() - (earlier[-1]["wall_time_s"] if earlier else 0.0)  # wall time spans resumes
    progress = Progress(total_steps, start_step, f"{mode} {config.model.name}", config.progress and is_main)

    def save(step: int, meta: dict) -> None:
        host = sharding.to_host(state)
        model = model_variables({"params": host.params, "batch_stats": host.batch_stats})
        items = {"state": host, "model": model, "card": card, "meta": {**meta, "run": run}, "data": batches.state()}
        checkpointer.save(step, items)

    def stop_if_preempted(step: int, sigterm: dict, meta: dict) -> None:
        reason = _preemption(sigterm, checkpointer, step) if step < total_steps else None
        if reason:
            metrics_log.flush()  # the per-step values up to the checkpoint's step
            save(step, {**meta, "reason": reason})
            checkpointer.close()
            progress.close()
            batches.close()
            raise SystemExit(
                f"preempted ({reason}): checkpoint at step {step} written in {workdir}; rerun the "
                "same command to resume"
            )

    last_record: dict = {}
    with _sigterm_flag() as sigterm:
        step = start_step
        while step < total_steps:
            epoch = step // num_steps
            # a mid-epoch resume of the stream continues from its saved iterator state
            batches.start(epoch, jax.random.fold_in(seed_key, epoch), data_state if step % num_steps else None)
            data_state = None
            sums, partial = dict(partial), {}
            epoch_t0, images_seen = time.time(), 0
            while step < (epoch + 1) * num_steps:
                offset = step - epoch * num_steps
                count = min(chunk, num_steps - offset)
                t0 = time.time()
                state, step_metrics = batches.run(state, teacher_variables, offset, count)
                step_metrics = sharding.to_host(step_metrics)
                _check_finite(step_metrics, step, config.on_nonfinite, divergence_hint(config))
                _accumulate(sums, step_metrics)
                metrics_log.write_steps(step, step_metrics)  # every log_every_steps-th step, at its global step
                step += count
                images_seen += count * config.batch_size
                progress.update(
                    count,
                    epoch=epoch + 1,
                    loss=f"{step_metrics['loss'][-1]:.4f}",
                    img_s=f"{count * config.batch_size / max(time.time() - t0, 1e-9):,.0f}",
                )
                if step < (epoch + 1) * num_steps:
                    stop_if_preempted(step, sigterm, {"partial_sums": sums, "records": metrics_log.records})
            _check_some_step_applied(sums, epoch + 1, num_steps, divergence_hint(config))
            record = _epoch_record(epoch + 1, step, sums, time.time() - epoch_t0, images_seen, time.time() - run_start)
            variables = model_variables({"params": state.params, "batch_stats": state.batch_stats})
            for name, split in evaluations.items():
                logits = predictor.logits_of(variables, split)
                summary = classification_summary(logits, split.labels, data.num_classes, data.plan.drop_classes)
                record.update({f"{name}_{k}": v for k, v in summary.items()})
            metrics_log.write(record)
            progress.epoch_done(epoch + 1, config.num_epochs, _epoch_line(record))
            last_record = record
            if (epoch + 1) % config.checkpoint_every_epochs == 0 or step == total_steps:
                save(step, {"epoch": epoch + 1, "records": metrics_log.records})
            stop_if_preempted(step, sigterm, {"epoch": epoch + 1, "records": metrics_log.records})
    batches.close()
    progress.close()
    checkpointer.close()
    metrics_log.close()
    return last_record


def _preemption(sigterm: dict, checkpointer: Checkpointer, step: int) -> str | None:
    """Why to stop now, or None: SIGTERM on any process, or the preemption notice of JAX's distributed runtime
    (Orbax's `reached_preemption`, a sync point every process reaches at the same step). All processes must agree,
    or a checkpoint barrier would deadlock."""
    stop = bool(sigterm["set"])
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        stop = bool(np.max(multihost_utils.process_allgather(np.int32(stop))))
    if stop:
        return "SIGTERM"
    return "preemption notice" if checkpointer.reached_preemption(step) else None


def _accumulate(sums: dict, step_metrics: dict) -> None:
    """Adds a dispatch's per-step metrics to the epoch sums; steps skipped by on_nonfinite='skip' are not averaged."""
    finite = step_metrics["nonfinite"] == 0
    for k, v in step_metrics.items():
        sums[k] = sums.get(k, 0.0) + float(np.sum(v if k == "nonfinite" else v[finite]))
    sums["_count"] = sums.get("_count", 0.0) + int(finite.sum())
    sums["_last_lr"] = float(step_metrics["learning_rate"][-1])


def _check_some_step_applied(sums: dict, epoch: int, num_steps: int, hint: str) -> None:
    """With on_nonfinite='skip', an epoch in which every step was skipped is a failed run, not a result."""
    if num_steps and sums.get("_count", 0) == 0:
        raise NonFiniteLossError(
            f"on_nonfinite='skip' skipped every one of the {num_steps} steps of epoch {epoch} (the loss was "
            f"non-finite at each): the model no longer trains; {hint}, and start a new --workdir"
        )


def _check_finite(step_metrics: dict, first_step: int, policy: str, hint: str) -> None:
    """Stops at the first non-finite step, naming the parts of the loss that were and `hint` (the config's likely
    causes: loss weights above 1e6, the learning rate)."""
    bad = np.flatnonzero(step_metrics["nonfinite"] > 0)
    if len(bad) == 0 or policy == "skip":
        return
    i = int(bad[0])
    parts = {k: float(v[i]) for k, v in step_metrics.items() if k not in ("nonfinite", "learning_rate", "accuracy")}
    culprits = [k for k, v in parts.items() if not np.isfinite(v) and k != "loss"] or ["loss"]
    raise NonFiniteLossError(
        f"non-finite loss at step {first_step + i}: {', '.join(culprits)} = "
        f"{', '.join(str(parts[k]) for k in culprits)} (all parts: {parts}); "
        f"{hint}, or set on_nonfinite='skip' to skip such steps"
    )


def _epoch_record(epoch: int, step: int, sums: dict, epoch_time: float, images_seen: int, wall: float) -> dict:
    count = max(sums.get("_count", 1.0), 1.0)
    record = {"epoch": epoch, "step": step}
    averaged = {k: v for k, v in sums.items() if not k.startswith("_") and k not in ("learning_rate", "nonfinite")}
    record.update({f"train_{k}": v / count for k, v in averaged.items()})
    record["train_skipped_steps"] = int(sums.get("nonfinite", 0))
    record.update(
        learning_rate=sums.get("_last_lr"),
        epoch_time_s=epoch_time,
        img_per_s=images_seen / max(epoch_time, 1e-9),
        wall_time_s=wall,
    )
    return record


def _epoch_line(record: dict) -> str:
    parts = [f"loss {record.get('train_loss', float('nan')):.4f}"]
    for key in ("val_acc", "test_acc"):
        if key in record:
            parts.append(f"{key} {record[key] * 100:.2f}%")
    parts.append(f"{record['img_per_s']:,.0f} img/s, {record['epoch_time_s']:.1f} s")
    return ", ".join(parts)
