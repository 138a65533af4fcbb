"""Timing the library's distillation step (and its parts) on random device-resident data; the report table.

What is timed: the step `extkd_jax.train.setup.build` makes for resnet56 -> resnet20 `extended_kd` (CE + T^2 KL at
T=4 + MSE of the 3 stage outputs, SGD momentum 0.9, weight decay 5e-4), driven by `make_run_steps` (gather from a
uint8 set on the device, 'cifar' augmentation, normalisation, step), in two forms:
  scan      K steps in one compiled program (`lax.scan`): the accelerator default;
  dispatch  the one-step program called K times, the host never waiting: the CPU default.
The frozen teacher's BatchNorm statistics are calibrated on one random batch (a random resnet56 in eval mode has
activations ~1e3 otherwise); that changes the numbers, not the work.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from extkd_jax.configs import base
from extkd_jax.models import forward_with_segments
from extkd_jax.train import sharding
from extkd_jax.train.epoch import epoch_permutation, make_run_steps
from extkd_jax.train.setup import DTYPES, build, build_model
from extkd_jax.train.step import Network, normalize, split

# Forward of resnet56 (~0.25 GFLOP) + forward/backward of resnet20 (~3 x 0.08 GFLOP) per 32x32 image.
FLOP_PER_IMAGE = 0.5e9
# (device_kind substring, ceiling), most specific first: dense bf16 tensor-core peak and HBM bandwidth (data sheets).
CEILINGS = [
    ("H100 PCIe", {"name": "H100 PCIe", "bf16_dense_tflops": 756.0, "hbm_tb_s": 2.0}),
    ("H100", {"name": "H100 SXM", "bf16_dense_tflops": 989.0, "hbm_tb_s": 3.35}),
    ("H200", {"name": "H200", "bf16_dense_tflops": 989.0, "hbm_tb_s": 4.8}),
    ("A100", {"name": "A100 SXM", "bf16_dense_tflops": 312.0, "hbm_tb_s": 2.0}),
]
JAX_CONFIGS = {
    "bf16_fold": ("bfloat16", True),
    "f32_nofold": ("float32", False),
    "bf16_nofold": ("bfloat16", False),
    "f32_fold": ("float32", True),
}
FORMS = ("scan", "dispatch")
CIFAR_MEAN = np.asarray((125.3, 123.0, 113.9), np.float32)  # per-channel statistics of the CIFAR-10 training set
CIFAR_STD = np.asarray((63.0, 62.1, 66.7), np.float32)
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_compile_seconds = [0.0]
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **_: (
        _compile_seconds.__setitem__(0, _compile_seconds[0] + duration) if event in COMPILE_EVENTS else None
    )
)


def ceiling_for(device_kind: str) -> dict | None:
    return next((dict(v) for key, v in CEILINGS if key.lower() in device_kind.lower()), None)


def bench_config(compute_dtype: str, fold: bool, batch_size: int, loss: str = "extended_kd"):
    c = base.get_config()
    c.model.name, c.teacher.name, c.teacher.fold_batchnorm = "resnet20", "resnet56", fold
    c.loss.name, c.loss.temperature, c.loss.ce_weight, c.loss.kd_weight = loss, 4.0, 1, 1
    if loss in c.loss and "weight" in c.loss[loss]:
        c.loss[loss].weight = 1.0
    c.data.name, c.batch_size, c.compute_dtype = "cifar10", batch_size, compute_dtype
    return c


def calibrated_teacher(compute_dtype: str, images: np.ndarray, seed: int = 100) -> tuple[Network, dict]:
    """A random resnet56 whose BatchNorm running statistics are those of `images` (set through a train-mode pass
    with momentum 0)."""
    dtype = DTYPES[compute_dtype]
    graph, variables = split(build_model("resnet56", {}, 10, seed, dtype))
    network = Network(graph, CIFAR_MEAN, CIFAR_STD, dtype)

    @jax.jit
    def calibrate(variables, images):
        model = graph.merge(variables)
        bns = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
        for m in bns:
            m.momentum = 0.0
        forward_with_segments(model, normalize(images, CIFAR_MEAN, CIFAR_STD, dtype), train=True)
        return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

    return network, {**variables, "batch_stats": calibrate(variables, images)}


class Bench:
    """One configuration's step, state and device-resident data, ready to time."""

    def __init__(
        self, batch_size: int, compute_dtype: str, fold: bool, steps: int, seed: int = 0, loss: str = "extended_kd"
    ):
        self.batch_size, self.steps = batch_size, steps
        self.mesh = sharding.make_mesh()
        sharding.check_batch_divisible(batch_size, self.mesh)
        rng = np.random.default_rng(seed)
        n = batch_size * steps
        images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(n,), dtype=np.int32)
        teacher = calibrated_teacher(compute_dtype, images[:256]) if loss != "ce" else None
        self.setup = build(
            bench_config(compute_dtype, fold, batch_size, loss), 10, (32, 32, 3), steps, CIFAR_MEAN, CIFAR_STD, teacher
        )
        self.run_steps = make_run_steps(self.setup.step_fn, self.mesh, batch_size, "cifar")
        self.state = sharding.put_replicated(self.setup.init_state(), self.mesh)
        self.teacher_variables = (
            None if teacher is None else sharding.put_replicated(self.setup.teacher_variables, self.mesh)
        )
        self.images, self.labels = sharding.put_replicated((images, labels), self.mesh)
        self.key = jax.random.key(seed)
        self.perm = epoch_permutation(self.key, n)

    def call(self, start: int, num_steps: int):
        self.state, metrics = self.run_steps(
            self.state,
            self.teacher_variables,
            self.images,
            self.labels,
            self.perm,
            self.key,
            jnp.int32(start),
            num_steps=num_steps,
        )
        return metrics

    def rep(self, form: str):
        """`steps` steps as one scan program, or as `steps` one-step dispatches with one block at the end."""
        if form == "scan":
            metrics = self.call(0, self.steps)
        else:
            for i in range(self.steps):
                metrics = self.call(i, 1)
        jax.block_until_ready((self.state, metrics))
        return metrics


def time_form(bench: Bench, form: str, reps: int, profile_dir: str | None = None) -> dict:
    """Warm-up call (its JAX-measured compile time kept), then `reps` timed repetitions; the median reported."""
    before = _compile_seconds[0]
    t0 = time.perf_counter()
    bench.rep(form)
    first = time.perf_counter() - t0
    compile_s = _compile_seconds[0] - before
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        metrics = bench.rep(form)
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    images = bench.batch_size * bench.steps
    row = {
        "form": form,
        "batch_size": bench.batch_size,
        "steps": bench.steps,
        "reps": reps,
        "img_per_s": images / median,
        "img_per_s_best": images / min(times),
        "step_ms": 1000 * median / bench.steps,
        "timed_calls_s": times,
        "compile_s": compile_s,
        "first_call_s": first,
        "final_loss": float(sharding.to_host(metrics)["loss"][-1]),
    }
    if profile_dir:
        from profile_summary import format_summary, summarize

        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            bench.rep(form)
        try:
            row["profile"] = summarize(profile_dir)
            print(format_summary(row["profile"]), flush=True)
        except Exception as err:  # noqa: BLE001 - a trace format change must not lose the timings
            row["profile"] = {"error": f"{type(err).__name__}: {err}"[:500]}
    return row


def teacher_forward_ms(bench: Bench, reps: int) -> float:
    """ms per batch of the frozen teacher alone (eval mode), in a scan over the same gathered, augmented data."""
    from extkd_jax.data import augment_batch

    teacher, b = bench.setup.teacher, bench.batch_size

    @jax.jit
    def loop(variables, images, perm, key):
        def body(total, s):
            batch = jnp.take(images, jax.lax.dynamic_slice_in_dim(perm, s * b, b), axis=0)
            x = augment_batch(jax.random.fold_in(key, s), batch, "cifar")
            logits, segments = teacher.frozen_outputs(variables, x)
            # every output feeds the carry: no part of the forward can be dropped as dead code
            return total + logits.sum() + sum(s.astype(jnp.float32).sum() for s in segments), None

        return jax.lax.scan(body, jnp.zeros((), jnp.float32), jnp.arange(bench.steps))[0]

    args = (bench.teacher_variables, bench.images, bench.perm, bench.key)
    jax.block_until_ready(loop(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(loop(*args))
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times) / bench.steps


def host_info() -> dict:
    import flax
    import jaxlib
    import optax

    dev = jax.devices()[0]
    info = {
        "platform": jax.default_backend(),
        "device_kind": dev.device_kind,
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
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

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        info["torch"] = None
    return info


def table(rows: dict[str, dict[int, float | None]], batch_sizes: list[int]) -> str:
    """A fixed-width table of img/s, then the ratios of our rows to torch.compile AMP and torch eager fp32."""
    width = max([len(n) for n in rows] + [30])
    out = [f"{'implementation / mode (img/s)':<{width}} " + " ".join(f"{'B=' + str(b):>12}" for b in batch_sizes)]
    out += [
        f"{name:<{width}} " + " ".join(f"{v:>12.1f}" if v else f"{'-':>12}" for v in (vals.get(b) for b in batch_sizes))
        for name, vals in rows.items()
    ]
    for ref in ("torch compile_amp_bf16", "torch eager_fp32"):
        if ref not in rows:
            continue
        out += ["", f"{'ours / ' + ref:<{width}} " + " ".join(f"{'B=' + str(b):>12}" for b in batch_sizes)]
        for name, vals in rows.items():
            if name.startswith("jax"):
                cells = [vals.get(b) / rows[ref][b] if vals.get(b) and rows[ref].get(b) else None for b in batch_sizes]
                out.append(f"{name:<{width}} " + " ".join(f"{c:>12.2f}" if c else f"{'n/a':>12}" for c in cells))
    return "\n".join(out)


def ratios(rows: dict[str, dict[int, float | None]], batch_sizes: list[int]) -> dict[str, Any]:
    out = {}
    for name, vals in rows.items():
        if not name.startswith("jax"):
            continue
        out[name] = {
            f"vs_{ref.replace(' ', '_')}": {
                str(b): (vals[b] / rows[ref][b] if vals.get(b) and rows.get(ref, {}).get(b) else None)
                for b in batch_sizes
            }
            for ref in ("torch compile_amp_bf16", "torch eager_fp32")
        }
    return out
