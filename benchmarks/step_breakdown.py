"""The distill step taken apart: the frozen teacher's forward alone, and the student's CE step alone.

Both run as `steps` iterations inside one compiled `lax.scan` over the same device-resident uint8 data (gather,
'cifar' augmentation, normalisation), like the timed distill step, so the three times compare directly:
teacher forward + student step ~= distill step, and what is left over is the KD/segment losses and connectors.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def _timed(fn, *args, reps: int) -> tuple[float, float]:
    """(first call s, median of `reps` further calls s) with a block after each call."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return first, float(np.median(times))


def teacher_forward_seconds(bench: dict, batch_size: int, steps: int, reps: int, mean, std) -> dict:
    """Seconds per batch of the frozen teacher alone (eval mode, as the distill step runs it)."""
    from extkd_jax.data import augment_batch, normalize

    teacher = bench["program"].teacher
    dtype = bench["program"].compute_dtype

    @jax.jit
    def loop(teacher_vars, images, perm, key):
        def body(total, s):
            idx = jax.lax.dynamic_slice_in_dim(perm, s * batch_size, batch_size)
            x = augment_batch(jax.random.fold_in(key, s), jnp.take(images, idx, axis=0), "cifar")
            logits, segments = teacher(teacher_vars, normalize(x, mean, std).astype(dtype))
            # every output feeds the carry, so no part of the forward can be dropped as dead code
            return total + logits.sum() + sum(seg.astype(jnp.float32).sum() for seg in segments), None

        return jax.lax.scan(body, jnp.zeros((), jnp.float32), jnp.arange(steps))[0]

    first, median = _timed(loop, bench["teacher_vars"], bench["images"], bench["perm"], bench["key"], reps=reps)
    return {"step_ms": 1000 * median / steps, "first_call_s": first}


def student_step_seconds(make_config, compute_dtype: str, batch_size: int, steps: int, reps: int, mean, std,
                         bench: dict) -> dict:
    """Seconds per step of the student trained alone with cross-entropy (no teacher, no connectors)."""
    from extkd_jax.train.epoch import make_run_steps
    from extkd_jax.train.program import build_program

    config = make_config(compute_dtype, True, batch_size)
    config.loss.name = "ce"
    program = build_program(config, 10, (32, 32, 3), steps)
    run_steps = make_run_steps(program.step_fn, bench["mesh"], batch_size, "cifar", mean, std, program.compute_dtype)
    state = bench["sharding"].put_replicated(program.init_state(), bench["mesh"])

    def call(state):
        return run_steps(state, None, bench["images"], bench["labels"], bench["perm"], bench["key"], jnp.int32(0),
                         num_steps=steps)

    holder = {"state": state}

    def once():
        holder["state"], metrics = call(holder["state"])
        return metrics

    first, median = _timed(once, reps=reps)
    return {"step_ms": 1000 * median / steps, "first_call_s": first}


def breakdown(distill_step_ms: float, teacher: dict, student: dict) -> dict:
    """The three times and the share of the distill step each part explains."""
    rest = distill_step_ms - teacher["step_ms"] - student["step_ms"]
    return {
        "distill_step_ms": distill_step_ms,
        "teacher_forward": teacher,
        "student_ce_step": student,
        "teacher_fraction": teacher["step_ms"] / distill_step_ms,
        "student_fraction": student["step_ms"] / distill_step_ms,
        "kd_and_segment_losses_ms": rest,
        "note": "teacher forward + student CE step measured apart; the rest is the KD / segment losses, the "
        "connectors and the extra outputs the distill step keeps",
    }
