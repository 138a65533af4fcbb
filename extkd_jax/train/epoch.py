"""Device-resident epochs: gather, augment and step, `num_steps` steps per compiled program; batched prediction.

The uint8 training set lives on the devices, in one of two placements:

- replicated: every device holds the whole set; each epoch draws one global permutation, and step `s` takes
  batch `perm[s*B:(s+1)*B]`. Results do not depend on the number of devices.
- sharded (multi-host): device d holds only its slice of the set (each process places only its shard on its devices) and
  draws a permutation of its own slice; step `s` takes `B / D` local examples on every device.

Keys are `fold_in(epoch_key, s)`, so a run that resumes at any step repeats the uninterrupted run exactly,
whatever `steps_per_dispatch` is.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from extkd_jax.data import augment_batch
from extkd_jax.train.sharding import DATA_AXIS, batch_sharded, put_replicated, replicated
from extkd_jax.train.step import StepFn

# Folded into each epoch's key before the permutation is drawn, so the permutation and the per-step keys
# (folded with the step index 0, 1, ...) come from different streams.
PERMUTATION_STREAM = 0x5EED

PLACEMENTS = ("replicated", "sharded")


@functools.partial(jax.jit, static_argnames=("num_examples",))
def epoch_permutation(key: jax.Array, num_examples: int) -> jax.Array:
    return jax.random.permutation(jax.random.fold_in(key, PERMUTATION_STREAM), num_examples)


def _local_permutations(key: jax.Array, num_local: int):
    """Per device: a permutation of its own `num_local` examples (inside shard_map)."""
    device = jax.lax.axis_index(DATA_AXIS)
    return jax.random.permutation(jax.random.fold_in(jax.random.fold_in(key, PERMUTATION_STREAM), device), num_local)


def process_rows(total: int, mesh: Mesh) -> slice:
    """The rows of a `total`-example set that this process's devices hold in the sharded placement (device k of the
    mesh holds rows [k * n, (k + 1) * n), n = total // devices): what this process needs to read."""
    per_device = total // mesh.devices.size
    positions = [k for k, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
    if positions != list(range(positions[0], positions[-1] + 1)):
        raise ValueError(f"this process's devices are not contiguous in the mesh (positions {positions})")
    return slice(positions[0] * per_device, (positions[-1] + 1) * per_device)


class DeviceDataset:
    """The uint8 training images and labels placed on the mesh, and their per-epoch permutations.

    `images` and `labels` are rows `offset ..` of a set of `total` examples (the whole set unless this process
    read only its share, `process_rows`, for the sharded placement).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        mesh: Mesh,
        placement: str = "replicated",
        total: int | None = None,
        offset: int = 0,
    ):
        if placement not in PLACEMENTS:
            raise ValueError(f"data placement {placement!r}; expected one of {PLACEMENTS}")
        self.mesh, self.placement = mesh, placement
        total = len(images) if total is None else total
        devices = mesh.devices.size
        if placement == "sharded":
            self.num_local = total // devices  # a remainder of < D examples is left out
            keep = self.num_local * devices
            spec = NamedSharding(mesh, P(DATA_AXIS))

            def rows(index, array):
                start, stop = index[0].start - offset, index[0].stop - offset
                if start < 0 or stop > len(array):
                    raise ValueError(
                        f"this process holds rows {offset}..{offset + len(array)} of the training set, "
                        f"a device needs {index[0].start}..{index[0].stop}"
                    )
                return array[start:stop]

            # each process materialises only the slices of its own devices
            self.images = jax.make_array_from_callback((keep, *images.shape[1:]), spec, lambda i: rows(i, images))
            self.labels = jax.make_array_from_callback((keep,), spec, lambda i: rows(i, labels))
            self.num_examples = keep
            self._perm = jax.jit(
                jax.shard_map(
                    lambda key: _local_permutations(key, self.num_local),
                    mesh=mesh,
                    in_specs=P(),
                    out_specs=P(DATA_AXIS),
                )
            )
        else:
            if len(images) != total:
                raise ValueError(f"the replicated placement needs every row: got {len(images)} of {total}")
            self.images, self.labels = put_replicated((images, labels), mesh)
            self.num_examples = self.num_local = total

    def permutation(self, key: jax.Array) -> jax.Array:
        if self.placement == "sharded":
            return self._perm(key)
        return epoch_permutation(key, self.num_examples)

    def steps_per_epoch(self, batch_size: int) -> int:
        return steps_per_epoch(self.num_examples, batch_size, self.mesh.devices.size, self.placement)


# Steps per dispatch of the stream pipeline on accelerators: enough to hide the dispatch, few enough that the
# host's read-ahead keeps up.
STREAM_STEPS_PER_DISPATCH = 8


def default_steps_per_dispatch(steps_per_epoch: int, pipeline: str = "device") -> int:
    """One compiled program per epoch on accelerators (a few steps when streaming); one step per dispatch on CPU,
    where XLA runs the convolution gradients 10-50x slower inside a loop (jax-ml/jax#12868; see benchmarks/)."""
    if jax.default_backend() == "cpu":
        return 1
    return steps_per_epoch if pipeline == "device" else min(STREAM_STEPS_PER_DISPATCH, steps_per_epoch)


def steps_per_epoch(num_examples: int, batch_size: int, num_devices: int, placement: str) -> int:
    """Full batches per epoch (the last partial batch is dropped)."""
    if placement == "sharded":
        return (num_examples // num_devices) // (batch_size // num_devices)
    return num_examples // batch_size


def make_run_steps(step_fn: StepFn, mesh: Mesh, batch_size: int, augment_kind: str, placement: str = "replicated"):
    """Returns jitted `run_steps(state, teacher_vars, images, labels, perm, key, start, num_steps)`.

    It runs steps `start .. start+num_steps-1` of the epoch in one program (`lax.scan`) and returns the new state
    and per-step metrics stacked along axis 0. `state` is donated.
    """
    batch_spec = batch_sharded(mesh)
    local_batch = batch_size // mesh.devices.size

    def local_gather(perm, images, labels, s):
        idx = jax.lax.dynamic_slice_in_dim(perm, s * local_batch, local_batch)
        return jnp.take(images, idx, axis=0), jnp.take(labels, idx, axis=0)

    sharded_gather = jax.shard_map(
        local_gather,
        mesh=mesh,
        in_specs=(P(DATA_AXIS), P(DATA_AXIS), P(DATA_AXIS), P()),
        out_specs=(P(DATA_AXIS), P(DATA_AXIS)),
    )

    def gather(images, labels, perm, s):
        """(images, labels, positions in the transfer set; None where each device holds its own slice)."""
        if placement == "sharded":
            return (*sharded_gather(perm, images, labels, s), None)
        idx = jax.lax.dynamic_slice_in_dim(perm, s * batch_size, batch_size)
        idx = jax.lax.with_sharding_constraint(idx, batch_spec)
        return jnp.take(images, idx, axis=0), jnp.take(labels, idx, axis=0), idx

    def one_step(state, teacher_vars, images, labels, perm, key, s):
        x, y, idx = gather(images, labels, perm, s)
        return _augmented_step(step_fn, augment_kind, state, teacher_vars, x, y, key, s, idx)

    def run_steps(state, teacher_vars, images, labels, perm, key, start, num_steps):
        return _steps(lambda st, s: one_step(st, teacher_vars, images, labels, perm, key, s), state, start, num_steps)

    return jax.jit(run_steps, static_argnames=("num_steps",), donate_argnums=(0,), out_shardings=replicated(mesh))


def _augmented_step(step_fn: StepFn, augment_kind: str, state, teacher_vars, x, y, key, s, idx=None):
    """Step `s` of an epoch: its augmentation and step keys come from (epoch key, s) alone, whatever the pipeline,
    the dispatch size or the number of devices. `idx`: the batch's positions in the transfer set, if known."""
    aug_key, step_key = jax.random.split(jax.random.fold_in(key, s))
    x = augment_batch(aug_key, x, augment_kind)
    return step_fn(state, teacher_vars, x, y, step_key, indices=idx)


def _steps(one_step, state, start, num_steps: int):
    """Steps start .. start+num_steps-1 with per-step metrics stacked on axis 0."""
    if num_steps == 1:  # no loop: XLA:CPU runs conv gradients much slower inside one (jax#12868)
        state, metrics = one_step(state, start)
        return state, jax.tree.map(lambda m: m[None], metrics)
    return jax.lax.scan(lambda st, i: one_step(st, start + i), state, jnp.arange(num_steps, dtype=jnp.int32))


def make_run_batches(step_fn: StepFn, mesh: Mesh, augment_kind: str):
    """Returns jitted `run_batches(state, teacher_vars, images, labels, key, start)` for the stream pipeline:
    steps `start ..` on the given batches, images (K, B, ...) and labels (K, B). `state` is donated."""

    def run_batches(state, teacher_vars, images, labels, key, start):
        def one_step(st, s):
            i = s - start
            return _augmented_step(step_fn, augment_kind, st, teacher_vars, images[i], labels[i], key, s)

        return _steps(one_step, state, start, images.shape[0])

    return jax.jit(run_batches, donate_argnums=(0,), out_shardings=replicated(mesh))


def make_predict(logits_fn, mesh: Mesh, batch_size: int):
    """Returns jitted `predict(variables, images, start) -> float32 logits` of one padded eval batch, where
    `logits_fn(variables, pixel_images)` is a network's eval-mode logits (it normalises its own input)."""
    batch_spec = batch_sharded(mesh)

    def predict(variables, images, start):
        x = jax.lax.dynamic_slice_in_dim(images, start, batch_size)
        x = jax.lax.with_sharding_constraint(x, batch_spec)
        return logits_fn(variables, x).astype(jnp.float32)

    return jax.jit(predict, out_shardings=replicated(mesh))
