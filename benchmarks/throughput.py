#!/usr/bin/env python
"""Throughput of the extkd_jax distillation step next to the PyTorch reference, on one machine, in one run.

What is timed (all on random, device-resident data; compile time excluded and reported separately):

- **ours**: the library's jitted distill step, built exactly as a run builds it (``configs/base.py`` with
  ``model.name='resnet20'``, ``loss.name='extended_kd'`` = CE + T^2 KL (T=4) + 3-segment MSE with connectors,
  SGD momentum 0.9 + weight decay 5e-4, teacher ``resnet56`` with or without BatchNorm folding), driven by
  ``extkd_jax.train.epoch.make_run_steps`` (gather from a uint8 device-resident set, 'cifar' augmentation,
  normalisation, step) in these forms:

  * ``scan``: K steps in one compiled program (``num_steps=K``, a ``lax.scan``): the accelerator default,
  * ``dispatch``: the ``num_steps=1`` program (one step, no loop) called K times, host never waits: the
    library's no-loop path and the CPU default (XLA:CPU runs conv gradients much slower in a loop, see README),
  * ``dispatch_sync``: as ``dispatch`` but the step metrics are fetched to the host after every call, which is
    what ``train/loop.py`` does after each dispatch (so this is a run with ``steps_per_dispatch=1``,
    i.e. what a CPU run does by default).

  ``scan`` and ``dispatch`` are both reported so that the per-platform default (``steps_per_dispatch=0``:
  ``default_steps_per_dispatch`` in ``extkd_jax/train/epoch.py``) can be checked on each platform.

- **torch**: ``benchmarks/torch_reference.benchmark_torch`` in modes ``eager_fp32``,
  ``eager_amp_bf16_channels_last`` and ``compile_amp_bf16`` (a failure of ``torch.compile`` is recorded).

Usage::

    python benchmarks/throughput.py --quick                  # CPU: batch 8,16, 2 steps, < 5 min on 2 cores
    python benchmarks/throughput.py                          # GPU: batch 256,1024, 50 steps, all 4 JAX configs
    python benchmarks/throughput.py --epoch-seconds          # + seconds per cifar10_drop epoch
    python benchmarks/throughput.py --profile /tmp/prof --dump-hlo /tmp/hlo   # where the time goes

See benchmarks/README.md for how to read the output, the profile and the HLO dump.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCH_DIR = pathlib.Path(__file__).resolve().parent

# Forward of resnet56 (~0.25 GFLOP) + forward/backward of resnet20 (~3 x 0.08 GFLOP) per 32x32 image.
FLOP_PER_IMAGE = 0.5e9

# (device_kind substring, ceiling). First match wins, so the more specific names come first. Dense bf16 tensor
# core peak (no sparsity) and HBM bandwidth from the vendor data sheets.
CEILINGS: list[tuple[str, dict[str, Any]]] = [
    ("H100 PCIe", {"name": "H100 PCIe", "bf16_dense_tflops": 756.0, "hbm_tb_s": 2.0}),
    ("H100", {"name": "H100 SXM", "bf16_dense_tflops": 989.0, "hbm_tb_s": 3.35}),
    ("H200", {"name": "H200", "bf16_dense_tflops": 989.0, "hbm_tb_s": 4.8}),
    ("A100", {"name": "A100 SXM", "bf16_dense_tflops": 312.0, "hbm_tb_s": 2.0}),
]

JAX_CONFIGS = {  # label -> (compute_dtype, fold teacher BN)
    "bf16_fold": ("bfloat16", True),
    "f32_nofold": ("float32", False),
    "bf16_nofold": ("bfloat16", False),
    "f32_fold": ("float32", True),
}
MAIN_CONFIG = "bf16_fold"  # the recommended configuration; f32_nofold is the plain baseline
TORCH_MODES = ("eager_fp32", "eager_amp_bf16_channels_last", "compile_amp_bf16")
JAX_FORMS = ("scan", "dispatch", "dispatch_sync")

# CIFAR-10 per-channel mean / std in pixel units (the values `channel_stats` gives on the training set).
CIFAR_MEAN = (125.3, 123.0, 113.9)
CIFAR_STD = (63.0, 62.1, 66.7)

_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_compile_seconds = {"total": 0.0}
_listener_installed = False


def ceiling_for(device_kind: str) -> dict[str, Any] | None:
    for key, value in CEILINGS:
        if key.lower() in device_kind.lower():
            return dict(value)
    return None


def _ensure_paths() -> None:
    for p in (str(REPO), str(BENCH_DIR)):
        if p not in sys.path:
            sys.path.insert(0, p)


def _install_compile_listener() -> None:
    """Sums JAX's own trace + lower + XLA-compile durations, so compile time is measured, not guessed."""
    global _listener_installed
    if _listener_installed:
        return
    import jax

    def listener(event: str, duration: float, **_: Any) -> None:
        if event in _COMPILE_EVENTS:
            _compile_seconds["total"] += duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    _listener_installed = True


# --------------------------------------------------------------------------------------------------- JAX side


def make_config(
    compute_dtype: str,
    fold_batchnorm: bool,
    batch_size: int,
    student: str = "resnet20",
    teacher: str = "resnet56",
):
    """The library config of the benchmarked distillation (configs/base.py + the extended_kd recipe)."""
    _ensure_paths()
    from configs import base

    c = base.get_config()
    c.model.name = student
    c.model.kwargs = {}
    c.teacher.name = teacher
    c.teacher.fold_batchnorm = bool(fold_batchnorm)
    c.loss.name = "extended_kd"
    c.loss.temperature = 4.0
    c.loss.ce_weight = 1.0
    c.loss.kd_weight = 1.0
    c.loss.segment_weight = 1.0
    c.optim.momentum = 0.9
    c.optim.weight_decay = 5e-4
    c.data.name = "cifar10"
    c.batch_size = int(batch_size)
    c.compute_dtype = compute_dtype
    return c


def calibrate_teacher_bn(model, images) -> None:
    """Sets every BatchNorm's running statistics of `model` to the statistics of `images` (in place).

    Same purpose as torch_reference.calibrate_bn_: a random resnet56 in eval mode with mean 0 / var 1 statistics
    blows its activations up through the residual stages; calibrated, it has the activation scale of a trained
    teacher. It changes the numbers, not the work per step (flax BN: biased variance; torch: unbiased).
    """
    from flax import nnx

    from extkd_jax.models import forward_with_segments

    bns = [m for _, m in nnx.iter_graph(model, graph=True) if isinstance(m, nnx.BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0  # running = 0 * old + 1 * batch statistics
    forward_with_segments(model, images, train=True)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum


_PROGRAM_CACHE: dict[tuple, Any] = {}


def _calibrated_teacher(name: str, kwargs, num_classes: int, seed: int, compute_dtype: str, images_uint8):
    """The teacher (random weights, BN statistics calibrated on `images_uint8`) as ModelParts."""
    import jax
    from flax import nnx

    from extkd_jax.data import normalize
    from extkd_jax.train.builders import DTYPES, build_model
    from extkd_jax.train.state import ModelParts, split_model

    dtype = DTYPES[compute_dtype]
    parts = split_model(build_model(name, kwargs or {}, num_classes, seed, dtype))

    @jax.jit
    def calibrated(params, batch_stats, images):
        m = parts.merge(params, batch_stats)
        calibrate_teacher_bn(m, normalize(images, CIFAR_MEAN, CIFAR_STD).astype(dtype))
        return nnx.state(m, nnx.BatchStat).to_pure_dict()

    stats = calibrated(parts.params, parts.batch_stats, images_uint8)
    return ModelParts(parts.graphdef, parts.params, stats, parts.other)


def build_program_cached(
    compute_dtype: str,
    fold_bn: bool,
    steps_per_epoch: int,
    calib_images,
    seed: int = 0,
    student: str = "resnet20",
    teacher: str = "resnet56",
    student_kwargs=None,
    teacher_kwargs=None,
    num_classes: int = 10,
):
    """`build_program` of the benchmarked config; cached (the program does not depend on the batch size)."""
    from extkd_jax.train.program import build_program

    key = (
        compute_dtype,
        bool(fold_bn),
        steps_per_epoch,
        seed,
        student,
        teacher,
        repr(sorted((student_kwargs or {}).items())),
        repr(sorted((teacher_kwargs or {}).items())),
        num_classes,
    )
    if key not in _PROGRAM_CACHE:
        c = make_config(compute_dtype, fold_bn, calib_images.shape[0], student, teacher)
        if student_kwargs:
            c.model.kwargs = dict(student_kwargs)
        teacher_parts = _calibrated_teacher(
            teacher, teacher_kwargs, num_classes, seed + 100, compute_dtype, calib_images
        )
        _PROGRAM_CACHE[key] = build_program(c, num_classes, (32, 32, 3), steps_per_epoch, teacher_parts)
    return _PROGRAM_CACHE[key]


def build_jax_bench(
    batch_size: int,
    compute_dtype: str,
    fold_bn: bool,
    num_examples: int,
    steps_per_epoch: int,
    seed: int = 0,
    student: str = "resnet20",
    teacher: str = "resnet56",
    student_kwargs=None,
    teacher_kwargs=None,
    num_classes: int = 10,
) -> dict:
    """Everything one configuration's timing needs: program, jitted run_steps and device-resident data."""
    _ensure_paths()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from extkd_jax.train import sharding
    from extkd_jax.train.epoch import epoch_permutation, make_run_steps

    mesh = sharding.make_mesh()
    sharding.check_batch_divisible(batch_size, mesh)
    rng = np.random.default_rng(seed)
    host_images = rng.integers(0, 256, size=(num_examples, 32, 32, 3), dtype=np.uint8)
    host_labels = rng.integers(0, num_classes, size=(num_examples,), dtype=np.int32)
    program = build_program_cached(
        compute_dtype,
        fold_bn,
        steps_per_epoch,
        host_images[: min(256, num_examples)],
        seed,
        student,
        teacher,
        student_kwargs,
        teacher_kwargs,
        num_classes,
    )
    mean = np.asarray(CIFAR_MEAN, np.float32)
    std = np.asarray(CIFAR_STD, np.float32)
    run_steps = make_run_steps(program.step_fn, mesh, batch_size, "cifar", mean, std, program.compute_dtype)
    state = sharding.put_replicated(program.init_state(), mesh)
    teacher_vars = sharding.put_replicated(program.teacher_vars, mesh)
    images = sharding.put_replicated(host_images, mesh)
    labels = sharding.put_replicated(host_labels, mesh)
    key = jax.random.fold_in(jax.random.key(seed), 1)
    perm = epoch_permutation(key, num_examples)
    jax.block_until_ready((state, teacher_vars, images, labels, perm))
    return {
        "run_steps": run_steps,
        "state": state,
        "teacher_vars": teacher_vars,
        "images": images,
        "labels": labels,
        "perm": perm,
        "key": key,
        "program": program,
        "jnp": jnp,
        "jax": jax,
        "sharding": sharding,
        "mesh": mesh,
    }


def _call(b: dict, start: int, num_steps: int):
    jnp = b["jnp"]
    args = (b["state"], b["teacher_vars"], b["images"], b["labels"], b["perm"], b["key"], jnp.int32(start))
    b["state"], metrics = b["run_steps"](*args, num_steps=num_steps)
    return metrics


def _row(batch_size: int, steps: int, seconds: list[float]) -> dict:
    per_call = statistics.median(seconds)
    return {
        "img_per_s": batch_size * steps / per_call,
        "step_ms": 1000.0 * per_call / steps,
        "img_per_s_best": batch_size * steps / min(seconds),
        "timed_calls_s": seconds,
    }


def _time_form(b: dict, form: str, steps: int, reps: int, profile_dir: str | None = None) -> dict:
    """Warm-up call (compile; its JAX-reported compile time kept), then `reps` timed repetitions of `steps` steps.

    scan: one call of num_steps=steps. dispatch: `steps` calls of num_steps=1 (no loop), one block at the end.
    dispatch_sync: `steps` calls of one step, metrics fetched to the host after each (as train/loop.py does).
    """
    jax = b["jax"]
    to_host = b["sharding"].to_host
    k = steps if form == "scan" else 1
    _install_compile_listener()
    before = _compile_seconds["total"]
    t0 = time.perf_counter()
    metrics = _call(b, 0, k)
    jax.block_until_ready((b["state"], metrics))
    first_s = time.perf_counter() - t0
    compile_s = _compile_seconds["total"] - before

    def one_rep():
        if form == "scan":
            m = _call(b, 0, steps)
        else:
            for i in range(steps):
                m = _call(b, i, 1)
                if form == "dispatch_sync":
                    m = to_host(m)
        jax.block_until_ready((b["state"], m))
        return m

    times = []
    for _ in range(reps):
        t = time.perf_counter()
        metrics = one_rep()
        times.append(time.perf_counter() - t)
    row = {
        "form": form,
        **_row(b["batch_size"], steps, times),
        "compile_s": compile_s,
        "first_call_s": first_s,
        "final_loss": float(to_host(metrics)["loss"][-1]),
    }
    if profile_dir:
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            one_rep()
        row["profile_dir"] = str(profile_dir)
        try:
            from profile_summary import format_summary, summarize

            row["profile"] = summarize(profile_dir)
            print(format_summary(row["profile"]), flush=True)
        except Exception as e:  # noqa: BLE001 - a trace format change must not lose the timings
            row["profile"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    if not math.isfinite(row["final_loss"]):
        row["warning"] = "non-finite loss (timing still valid: same work per step)"
    return row


def benchmark_jax(
    batch_size: int,
    steps: int = 20,
    compute_dtype: str = "bfloat16",
    fold_bn: bool = True,
    forms=JAX_FORMS,
    reps: int = 3,
    seed: int = 0,
    profile_dir: str | None = None,
) -> dict:
    """Times the library's distill step at one batch size; returns {form: row} plus "setup_s".

    Each form's row: img_per_s (median over `reps` timed repetitions of `steps` steps), img_per_s_best, step_ms,
    compile_s (JAX's own trace + lower + XLA compile time of the warm-up call, from jax.monitoring; 0 when the
    program was already compiled, e.g. dispatch_sync after dispatch), first_call_s, final_loss.
    `profile_dir`: one extra repetition of the first form in `forms` under jax.profiler.trace.
    """
    t0 = time.perf_counter()
    num_examples = batch_size * max(steps, 1)
    b = build_jax_bench(
        batch_size, compute_dtype, fold_bn, num_examples, steps_per_epoch=max(steps, 1), seed=seed
    )
    b["batch_size"] = batch_size
    out: dict[str, Any] = {"setup_s": time.perf_counter() - t0}
    common = {
        "batch_size": batch_size,
        "compute_dtype": compute_dtype,
        "fold_bn": bool(fold_bn),
        "steps": steps,
        "reps": reps,
    }
    for i, form in enumerate(f for f in JAX_FORMS if f in forms):
        out[form] = {**common, **_time_form(b, form, steps, reps, profile_dir if i == 0 else None)}
    return out


# --------------------------------------------------------------------------------------------------- epoch


def cifar10_drop_shape() -> dict:
    """The cifar10_drop preset's epoch shape (configs/cifar10_drop.py when it exists), else the fallback."""
    path = REPO / "configs" / "cifar10_drop.py"
    fallback = {
        "source": "fallback (configs/cifar10_drop.py absent)",
        "student": "resnet20",
        "teacher": "resnet56",
        "batch_size": 512,
        "transfer_images": 40500,
        "compute_dtype": "bfloat16",
        "fold_bn": True,
        "student_kwargs": {},
        "teacher_kwargs": {},
    }
    if not path.exists():
        return fallback
    try:
        _ensure_paths()
        spec = importlib.util.spec_from_file_location("cifar10_drop_preset", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        c = module.get_config()
        train = 50000 - int(c.data.val_size)
        n_drop = len(tuple(c.data.drop_classes))
        keep = float(c.data.keep_fraction)
        transfer = round(train * (10 - n_drop * (1.0 - keep)) / 10)
        return {
            "source": str(path.relative_to(REPO)),
            "student": c.model.name,
            "teacher": c.teacher.name or "resnet56",
            "batch_size": int(c.batch_size),
            "transfer_images": transfer,
            "transfer_images_note": "approx.: (50000 - val_size) x kept fraction",
            "compute_dtype": c.compute_dtype,
            "note": "preset shapes (models, batch, epoch length, dtype, BN folding); the step timed is this "
            "benchmark's extended_kd step, not the preset's loss weights",
            "fold_bn": bool(c.teacher.fold_batchnorm),
            "student_kwargs": dict(c.model.kwargs),
            "teacher_kwargs": dict(c.teacher.kwargs),
            "scale": getattr(c, "scale", ""),
        }
    except Exception as e:  # noqa: BLE001
        fallback["source"] = f"fallback (reading {path.name} failed: {type(e).__name__}: {e})"
        return fallback


def epoch_seconds(shape: dict, measured: dict, direct: bool, seed: int = 0) -> dict:
    """Seconds per epoch of the preset: measured directly (one full-epoch scan program, timed after a warm-up
    epoch) when `direct`, else derived = steps_per_epoch x the step time at the preset batch, scaled from the
    largest measured batch of the same JAX config (img/s assumed constant in batch: stated in the result)."""
    steps_per_epoch = shape["transfer_images"] // shape["batch_size"]
    res = {**shape, "steps_per_epoch": steps_per_epoch}
    if direct:
        b = build_jax_bench(
            shape["batch_size"],
            shape["compute_dtype"],
            shape["fold_bn"],
            shape["transfer_images"],
            steps_per_epoch,
            seed=seed,
            student=shape["student"],
            teacher=shape["teacher"],
            student_kwargs=shape["student_kwargs"],
            teacher_kwargs=shape["teacher_kwargs"],
        )
        b["batch_size"] = shape["batch_size"]
        row = _time_form(b, "scan", steps_per_epoch, reps=1)
        res.update(
            {
                "method": "measured (one epoch = one scan program of steps_per_epoch steps, after a warm-up epoch)",
                "epoch_s": row["timed_calls_s"][0],
                "compile_s": row["compile_s"],
                "first_epoch_s": row["first_call_s"],
                "img_per_s": row["img_per_s"],
            }
        )
        return res
    label = ("bf16" if shape["compute_dtype"] == "bfloat16" else "f32") + (
        "_fold" if shape["fold_bn"] else "_nofold"
    )
    used = (
        label
        if any("scan" in r for r in measured.get(label, {}).values())
        else next((lab for lab, per in measured.items() if any("scan" in r for r in per.values())), None)
    )
    if used is None:
        res.update({"method": "not available (no jax scan measurement)", "epoch_s": None})
        return res
    if used != label:
        res["config_note"] = f"preset config {label} not measured; derived from {used} instead"
    label = used
    rows = [r for r in measured[label].values() if "scan" in r]
    largest = max(rows, key=lambda r: r["scan"]["batch_size"])
    best = largest["scan"]
    step_s = shape["batch_size"] / best["img_per_s"]
    res.update(
        {
            "method": (
                f"derived, not measured: steps_per_epoch x step time, step time = batch {shape['batch_size']} / "
                f"img/s of jax scan {label} at batch {best['batch_size']} (assumes img/s constant in batch)"
            ),
            "epoch_s": steps_per_epoch * step_s,
            "step_s": step_s,
            "from_batch_size": best["batch_size"],
            "img_per_s": best["img_per_s"],
        }
    )
    if "dispatch" in largest:  # the CPU default (num_steps=1, no loop), same scaling
        res["epoch_s_dispatch"] = steps_per_epoch * shape["batch_size"] / largest["dispatch"]["img_per_s"]
    return res


# --------------------------------------------------------------------------------------------------- report


def host_info() -> dict:
    import flax
    import jax
    import jaxlib
    import optax

    dev = jax.devices()[0]
    info = {
        "platform": jax.default_backend(),
        "device_kind": dev.device_kind,
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "hostname": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_default_threads"] = torch.get_num_threads()
        info["torch_cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        info["torch"] = None
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _flops(img_per_s: float | None, ceiling: dict | None) -> dict:
    if not img_per_s:
        return {}
    tflops = img_per_s * FLOP_PER_IMAGE / 1e12
    out = {"achieved_tflops": tflops}
    if ceiling:
        out["fraction_of_bf16_peak"] = tflops / ceiling["bf16_dense_tflops"]
    return out


def build_rows(jax_results: dict, torch_results: dict, batch_sizes: list[int]) -> list[dict]:
    """Table rows: {name, kind, values: {batch: img/s or None}, notes: {batch: str}}."""
    rows = []
    for label, per_batch in jax_results.items():
        for form in JAX_FORMS:
            vals, notes = {}, {}
            for bs in batch_sizes:
                r = per_batch.get(bs, {}).get(form)
                vals[bs] = r["img_per_s"] if r else None
                if r is None and bs in per_batch and "error" in per_batch[bs]:
                    notes[bs] = "error"
            if any(v is not None for v in vals.values()) or notes:
                rows.append(
                    {
                        "name": f"jax {form} {label}",
                        "kind": "jax",
                        "config": label,
                        "form": form,
                        "values": vals,
                        "notes": notes,
                    }
                )
    for mode, per_batch in torch_results.items():
        vals, notes = {}, {}
        for bs in batch_sizes:
            r = per_batch.get(bs)
            if r is None:
                vals[bs] = None
            elif "error" in r or "skipped" in r:
                vals[bs] = None
                notes[bs] = "skipped" if "skipped" in r else "error"
            else:
                vals[bs] = r["img_per_s"]
        rows.append({"name": f"torch {mode}", "kind": "torch", "mode": mode, "values": vals, "notes": notes})
    return rows


def ratios(rows: list[dict], batch_sizes: list[int]) -> dict:
    """{jax row name: {"vs_torch_compile_amp": {bs: r}, "vs_torch_eager_fp32": {bs: r}}}."""
    ref = {r["mode"]: r["values"] for r in rows if r["kind"] == "torch"}
    out = {}
    for r in rows:
        if r["kind"] != "jax":
            continue
        entry = {}
        for key, mode in (
            ("vs_torch_compile_amp", "compile_amp_bf16"),
            ("vs_torch_eager_fp32", "eager_fp32"),
        ):
            entry[key] = {
                bs: (
                    r["values"][bs] / ref[mode][bs]
                    if r["values"].get(bs) and ref.get(mode, {}).get(bs)
                    else None
                )
                for bs in batch_sizes
            }
        out[r["name"]] = entry
    return out


def format_table(rows: list[dict], rat: dict, batch_sizes: list[int]) -> str:
    w = max([len(r["name"]) for r in rows] + [30])
    lines = []
    head = f"{'implementation / mode (img/s)':<{w}} " + " ".join(f"{'B=' + str(b):>12}" for b in batch_sizes)
    lines += [head, "-" * len(head)]
    for r in rows:
        cells = []
        for bs in batch_sizes:
            v = r["values"].get(bs)
            cells.append(f"{v:>12.1f}" if v is not None else f"{r['notes'].get(bs, '-'):>12}")
        lines.append(f"{r['name']:<{w}} " + " ".join(cells))
    for key, title in (
        ("vs_torch_compile_amp", "ours / torch.compile AMP"),
        ("vs_torch_eager_fp32", "ours / torch eager fp32"),
    ):
        lines += ["", f"{title:<{w}} " + " ".join(f"{'B=' + str(b):>12}" for b in batch_sizes)]
        for name, entry in rat.items():
            cells = [
                f"{entry[key][bs]:>12.2f}" if entry[key][bs] is not None else f"{'n/a':>12}"
                for bs in batch_sizes
            ]
            lines.append(f"{name:<{w}} " + " ".join(cells))
    return "\n".join(lines)


def format_markdown(rows: list[dict], rat: dict, batch_sizes: list[int]) -> str:
    head = "| implementation / mode | " + " | ".join(f"B={b} img/s" for b in batch_sizes) + " |"
    lines = [head, "|" + "---|" * (len(batch_sizes) + 1)]
    for r in rows:
        cells = [
            f"{r['values'][bs]:.1f}" if r["values"].get(bs) is not None else r["notes"].get(bs, "-")
            for bs in batch_sizes
        ]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    for key, title in (
        ("vs_torch_compile_amp", "ours / torch.compile AMP"),
        ("vs_torch_eager_fp32", "ours / torch eager fp32"),
    ):
        lines += [
            "",
            f"| {title} | " + " | ".join(f"B={b}" for b in batch_sizes) + " |",
            "|" + "---|" * (len(batch_sizes) + 1),
        ]
        for name, entry in rat.items():
            cells = [f"{entry[key][bs]:.2f}" if entry[key][bs] is not None else "n/a" for bs in batch_sizes]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="CPU-friendly (< 5 min on 2 cores): batch 8,16, 2 steps, 1 rep, configs bf16_fold,f32_nofold, "
        "forms scan,dispatch, no torch.compile (unless --torch-compile)",
    )
    p.add_argument("--batch-sizes", default=None, help="comma-separated; default 256,1024 (--quick: 8,16)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps per timed repetition (scan length K, dispatch count K); default 50 (--quick: 2)",
    )
    p.add_argument(
        "--reps", type=int, default=None, help="timed repetitions, median reported; default 3 (--quick: 1)"
    )
    p.add_argument("--warmup", type=int, default=None, help="torch warm-up steps; default 5 (--quick: 2)")
    p.add_argument(
        "--configs",
        default=None,
        help=f"JAX configs among {','.join(JAX_CONFIGS)}; default all (--quick: bf16_fold,f32_nofold)",
    )
    p.add_argument(
        "--forms",
        default=None,
        help=f"JAX forms among {','.join(JAX_FORMS)}; default all (--quick: scan,dispatch)",
    )
    p.add_argument("--torch-modes", default=None, help=f"among {','.join(TORCH_MODES)}; default all")
    p.add_argument("--skip-torch", action="store_true", help="time only the JAX step")
    p.add_argument(
        "--skip-torch-compile",
        action="store_true",
        help="skip torch.compile (recorded as skipped in the JSON and table)",
    )
    p.add_argument("--torch-compile", action="store_true", help="with --quick: do time torch.compile")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads; 0 = torch's default. Default: torch's (--quick: 1, see README)",
    )
    p.add_argument(
        "--epoch-seconds",
        action="store_true",
        help="seconds per cifar10_drop epoch (derived from the step time with --quick, else measured)",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="jax.profiler.trace one extra timed call of the main config (last batch size) and summarise it",
    )
    p.add_argument(
        "--dump-hlo", default=None, metavar="DIR", help="sets XLA_FLAGS=--xla_dump_to=DIR before jax import"
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also time the teacher forward alone and the student CE step alone (main config, last batch size)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        default=None,
        help="JSON path; default benchmarks/results/throughput_<platform>_<YYYYMMDD>[_quick].json",
    )
    args = p.parse_args(argv)
    q = args.quick
    args.batch_sizes = [int(x) for x in (args.batch_sizes or ("8,16" if q else "256,1024")).split(",") if x]
    args.steps = args.steps or (2 if q else 50)
    if args.torch_threads is None:
        args.torch_threads = 1 if q else 0
    args.reps = args.reps or (1 if q else 3)
    args.warmup = args.warmup if args.warmup is not None else (2 if q else 5)
    args.configs = [
        x for x in (args.configs or ("bf16_fold,f32_nofold" if q else ",".join(JAX_CONFIGS))).split(",") if x
    ]
    args.forms = [x for x in (args.forms or ("scan,dispatch" if q else ",".join(JAX_FORMS))).split(",") if x]
    args.compile_skip_reason = None
    if args.skip_torch_compile:
        args.compile_skip_reason = "skipped (--skip-torch-compile)"
    elif q and not args.torch_compile:
        args.skip_torch_compile = True
        args.compile_skip_reason = (
            "skipped (--quick): on the 2-core CPU VM torch.compile's first step took 77 s "
            "(B=16) and 107 s (B=32); pass --torch-compile to include it"
        )
    args.torch_modes = [x for x in (args.torch_modes or ",".join(TORCH_MODES)).split(",") if x]
    for name, given, known in (
        ("--configs", args.configs, JAX_CONFIGS),
        ("--forms", args.forms, JAX_FORMS),
        ("--torch-modes", args.torch_modes, TORCH_MODES),
    ):
        bad = [x for x in given if x not in known]
        if bad:
            p.error(f"{name}: unknown {bad}; expected some of {tuple(known)}")
    return args


def _breakdown(args, jax_results: dict) -> dict:
    """Teacher forward and student step timed apart at the main config's largest batch (step_breakdown.py)."""
    import numpy as np

    import step_breakdown as sb

    label, bs = args.configs[0], args.batch_sizes[-1]
    dtype, fold = JAX_CONFIGS[label]
    measured = jax_results.get(label, {}).get(bs, {}).get("scan")
    if not measured:
        return {"error": f"no scan measurement of {label} at batch {bs} to compare with"}
    t = time.perf_counter()
    try:
        b = build_jax_bench(bs, dtype, fold, bs * args.steps, steps_per_epoch=args.steps, seed=args.seed)
        mean, std = np.asarray(CIFAR_MEAN, np.float32), np.asarray(CIFAR_STD, np.float32)
        teacher = sb.teacher_forward_seconds(b, bs, args.steps, args.reps, mean, std)
        student = sb.student_step_seconds(make_config, dtype, bs, args.steps, args.reps, mean, std, b)
        out = {"config": label, "batch_size": bs, **sb.breakdown(measured["step_ms"], teacher, student)}
    except Exception as e:  # noqa: BLE001 - the timings above stay valid
        return {"error": f"{type(e).__name__}: {e}"[:2000]}
    print(f"breakdown {label} B={bs}: distill {out['distill_step_ms']:.2f} ms = teacher forward "
          f"{teacher['step_ms']:.2f} ms + student CE step {student['step_ms']:.2f} ms + rest "
          f"{out['kd_and_segment_losses_ms']:.2f} ms  [{time.perf_counter() - t:.0f}s]", flush=True)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.dump_hlo:  # must precede the first jax import
        if "jax" in sys.modules:
            print("warning: jax already imported; --dump-hlo may not take effect", file=sys.stderr)
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={args.dump_hlo}"
        ).strip()
    _ensure_paths()
    _install_compile_listener()  # first jax import
    run_t0 = time.perf_counter()
    info = host_info()
    ceiling = ceiling_for(info["device_kind"])
    print(
        f"device: {info['platform']} {info['device_kind']} x{info['num_devices']}, cpus={info['cpu_count']}, "
        f"jax {info['jax']}, flax {info['flax']}, torch {info.get('torch')}",
        flush=True,
    )

    jax_results: dict[str, dict[int, dict]] = {}
    for label in args.configs:
        dtype, fold = JAX_CONFIGS[label]
        jax_results[label] = {}
        for i, bs in enumerate(args.batch_sizes):
            last = i == len(args.batch_sizes) - 1  # the largest batch: the headline figure
            prof = args.profile if (args.profile and label == args.configs[0] and last) else None
            t = time.perf_counter()
            try:
                res = benchmark_jax(
                    bs,
                    args.steps,
                    dtype,
                    fold,
                    forms=args.forms,
                    reps=args.reps,
                    seed=args.seed,
                    profile_dir=prof,
                )
            except Exception as e:  # noqa: BLE001 - e.g. out of memory at a large batch: record and go on
                res = {"error": f"{type(e).__name__}: {e}"[:2000]}
            jax_results[label][bs] = res
            summary = ", ".join(
                f"{f} {res[f]['img_per_s']:.1f} img/s (compile {res[f]['compile_s']:.1f}s)"
                for f in JAX_FORMS
                if f in res
            ) or res.get("error", "")
            print(f"jax {label} B={bs}: {summary}  [{time.perf_counter() - t:.0f}s]", flush=True)
            for f in JAX_FORMS:
                if f in res:
                    res[f].update(_flops(res[f]["img_per_s"], ceiling))

    parts = None
    if args.breakdown:
        parts = _breakdown(args, jax_results)

    torch_results: dict[str, dict[int, dict]] = {}
    if not args.skip_torch:
        try:
            import torch_reference as tr

            if args.torch_threads:
                import torch

                torch.set_num_threads(args.torch_threads)
        except Exception as e:  # noqa: BLE001 - torch missing
            tr = None
            torch_error = f"{type(e).__name__}: {e}"
        for mode in args.torch_modes:
            torch_results[mode] = {}
            for bs in args.batch_sizes:
                t = time.perf_counter()
                if tr is None:
                    r = {"mode": mode, "batch_size": bs, "error": torch_error}
                elif mode.startswith("compile") and args.skip_torch_compile:
                    r = {"mode": mode, "batch_size": bs, "skipped": args.compile_skip_reason}
                else:
                    r = tr.benchmark_torch(mode, bs, steps=args.steps, warmup=args.warmup)
                    r.update(_flops(r.get("img_per_s"), ceiling))
                torch_results[mode][bs] = r
                what = (
                    f"{r['img_per_s']:.1f} img/s (first step {r['first_step_s']:.1f}s)"
                    if "img_per_s" in r
                    else r.get("error", r.get("skipped", ""))
                )[:300]
                print(f"torch {mode} B={bs}: {what}  [{time.perf_counter() - t:.0f}s]", flush=True)

    epoch = None
    if args.epoch_seconds:
        shape = cifar10_drop_shape()
        try:
            epoch = epoch_seconds(shape, jax_results, direct=not args.quick, seed=args.seed)
        except Exception as e:  # noqa: BLE001
            epoch = {**shape, "error": f"{type(e).__name__}: {e}"[:2000]}
        print(
            f"cifar10_drop epoch: {epoch.get('epoch_s')} s ({epoch.get('method', epoch.get('error'))})",
            flush=True,
        )

    rows = build_rows(jax_results, torch_results, args.batch_sizes)
    rat = ratios(rows, args.batch_sizes)
    table = format_table(rows, rat, args.batch_sizes)
    print()
    print(table)
    if args.compile_skip_reason and not args.skip_torch:
        print(f"\ntorch compile_amp_bf16: {args.compile_skip_reason}")
    if ceiling:
        print(
            f"\nceiling ({ceiling['name']}): {ceiling['bf16_dense_tflops']} TFLOP/s bf16 dense, "
            f"{ceiling['hbm_tb_s']} TB/s HBM; achieved TFLOP/s = img/s x {FLOP_PER_IMAGE / 1e9} GFLOP / 1e12"
        )
    else:
        print(f"\nceiling: unknown for device_kind {info['device_kind']!r}")

    info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    now = datetime.datetime.now(datetime.UTC)
    result = {
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join(
            [os.path.relpath(sys.argv[0], REPO) if sys.argv and sys.argv[0] else "throughput.py"]
            + (argv if argv is not None else sys.argv[1:])
        ),
        "host": info,
        "settings": {
            "quick": args.quick,
            "batch_sizes": args.batch_sizes,
            "steps": args.steps,
            "reps": args.reps,
            "torch_warmup": args.warmup,
            "configs": args.configs,
            "forms": args.forms,
            "torch_modes": [] if args.skip_torch else args.torch_modes,
            "skip_torch": args.skip_torch,
            "skip_torch_compile": args.skip_torch_compile,
            "torch_compile_skip_reason": args.compile_skip_reason,
            "torch_threads": args.torch_threads or "torch default",
            "forms_note": {
                "scan": "library make_run_steps, num_steps=K: K steps in one program (lax.scan); "
                "the accelerator default",
                "dispatch": "library make_run_steps, num_steps=1 (the no-loop path, no lax.scan), called K "
                "times, one block at the end; the CPU default",
                "dispatch_sync": "as dispatch, metrics fetched to the host after every call (train/loop.py)",
                "defaults": "steps_per_dispatch=0 picks dispatch on CPU and scan elsewhere "
                "(default_steps_per_dispatch); both are reported so the default can be checked per platform",
            },
            "teacher": "resnet56",
            "student": "resnet20",
            "input": [32, 32, 3],
            "num_classes": 10,
            "loss": "extended_kd: CE + T^2 KL (T=4) + 3-segment MSE, weights 1/1/1",
            "optimizer": "SGD momentum 0.9, weight decay 5e-4",
            "augment": "cifar (jax only; torch: none)",
            "teacher_bn": "calibrated on one random batch (both sides)",
        },
        "flop_per_image": FLOP_PER_IMAGE,
        "ceiling": ceiling or "unknown",
        "jax": {label: {str(bs): r for bs, r in per.items()} for label, per in jax_results.items()},
        "torch": {mode: {str(bs): r for bs, r in per.items()} for mode, per in torch_results.items()},
        "table": [
            {
                **r,
                "values": {str(k): v for k, v in r["values"].items()},
                "notes": {str(k): v for k, v in r["notes"].items()},
            }
            for r in rows
        ],
        "ratios": {
            name: {k: {str(bs): v for bs, v in d.items()} for k, d in e.items()} for name, e in rat.items()
        },
        "table_markdown": format_markdown(rows, rat, args.batch_sizes),
        "epoch_seconds": epoch,
        "breakdown": parts,
        "wall_s": time.perf_counter() - run_t0,
    }
    out = (
        pathlib.Path(args.out)
        if args.out
        else (
            BENCH_DIR
            / "results"
            / f"throughput_{info['platform']}_{now:%Y%m%d}{'_quick' if args.quick else ''}.json"
        )
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {out} (total {result['wall_s']:.0f}s)")
    return result


if __name__ == "__main__":
    main()
