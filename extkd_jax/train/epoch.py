"""Device-resident epochs: gather, augment, normalise and step, `num_steps` steps per compiled program.

The uint8 training set lives on the devices (replicated). Each epoch draws a permutation from
`fold_in(key, epoch)`; step `s` of the epoch takes batch `perm[s*B:(s+1)*B]` and the keys `fold_in(epoch_key, s)`,
so a run that resumes at any step repeats the uninterrupted run exactly, whatever `steps_per_dispatch` is.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from extkd_jax.data import augment_batch, normalize
from extkd_jax.train.sharding import batch_sharded, replicated
from extkd_jax.train.steps import StepFn


def epoch_key(seed_key: jax.Array, epoch: int) -> jax.Array:
    return jax.random.fold_in(seed_key, epoch)


@functools.partial(jax.jit, static_argnames=("num_examples",))
def epoch_permutation(key: jax.Array, num_examples: int) -> jax.Array:
    return jax.random.permutation(jax.random.fold_in(key, 0x5EED), num_examples)


def make_run_steps(
    step_fn: StepFn,
    mesh: Mesh,
    batch_size: int,
    augment_kind: str,
    mean: jax.Array,
    std: jax.Array,
    compute_dtype: Any,
):
    """Returns jitted `run_steps(state, teacher_vars, images, labels, perm, key, start, num_steps)`.

    It runs steps `start .. start+num_steps-1` of the epoch in one program (`lax.scan`) and returns the new state
    and per-step metrics stacked along axis 0. `state` is donated.
    """
    batch_spec = batch_sharded(mesh)

    def run_steps(state, teacher_vars, images, labels, perm, key, start, num_steps):
        def body(state, i):
            s = start + i
            idx = jax.lax.dynamic_slice_in_dim(perm, s * batch_size, batch_size)
            idx = jax.lax.with_sharding_constraint(idx, batch_spec)
            x = jnp.take(images, idx, axis=0)
            y = jnp.take(labels, idx, axis=0)
            aug_key, step_key = jax.random.split(jax.random.fold_in(key, s))
            x = normalize(augment_batch(aug_key, x, augment_kind), mean, std).astype(compute_dtype)
            return step_fn(state, teacher_vars, x, y, step_key)

        return jax.lax.scan(body, state, jnp.arange(num_steps, dtype=jnp.int32))

    return jax.jit(
        run_steps, static_argnames=("num_steps",), donate_argnums=(0,), out_shardings=replicated(mesh)
    )


def make_predict(logits_fn, mesh: Mesh, batch_size: int, mean: jax.Array, std: jax.Array, compute_dtype: Any):
    """Returns jitted `predict(params, batch_stats, images, start) -> logits` of one padded eval batch."""
    batch_spec = batch_sharded(mesh)

    def predict(params, batch_stats, images, start):
        x = jax.lax.dynamic_slice_in_dim(images, start, batch_size)
        x = jax.lax.with_sharding_constraint(x, batch_spec)
        x = normalize(x, mean, std).astype(compute_dtype)
        return logits_fn(params, batch_stats, x).astype(jnp.float32)

    return jax.jit(predict, out_shardings=replicated(mesh))
