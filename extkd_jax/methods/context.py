"""What an objective sees (`Context`: the batch, the networks as functions of pixel images, the student's extra
modules) and `pooled`, shared by the methods (extkd_jax/methods)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from extkd_jax import losses


def pooled(segment: jax.Array) -> jax.Array:
    """The penultimate features of a segment: the global average over its spatial axes (a vector stays)."""
    return (
        segment if segment.ndim == 2 else jnp.mean(segment.astype(jnp.float32), axis=tuple(range(1, segment.ndim - 1)))
    )


@dataclasses.dataclass
class Context:
    """What an objective may use: the batch, the networks as functions of pixel images, the student's extras."""

    loss: Any  # the `loss` block of the config
    images: jax.Array  # pixel values (float), augmented (and mixed, when data.augment mixes)
    labels: jax.Array  # integer labels
    targets: jax.Array  # soft targets: one-hot, or mixed
    key: jax.Array  # the objective's randomness (sampling, attacks, rotations)
    epoch: jax.Array
    module: Any  # the Student wrapper: model, connectors, heads, projector
    pairs: tuple
    run_student: Callable  # pixel images -> (logits, segments), train mode
    run_teacher: Callable | None  # pixel images -> (logits, segments), frozen
    teacher_logits_fn: Callable | None  # pixel images -> logits (differentiable in the images: attacks)
    indices: jax.Array | None = None  # the batch's positions in the transfer set (device pipeline), for crd
    num_epochs: float = 0.0  # the run's length, for warm-ups given as a share of it (0: unknown, no warm-up)
    _cache: dict = dataclasses.field(default_factory=dict)

    def student(self, images: jax.Array | None = None):
        if images is not None:
            return self.run_student(images)
        if "student" not in self._cache:
            self._cache["student"] = self.run_student(self.images)
        return self._cache["student"]

    def teacher(self, images: jax.Array | None = None):
        if images is not None:
            return self.run_teacher(images)
        if "teacher" not in self._cache:
            self._cache["teacher"] = self.run_teacher(self.images)
        return self._cache["teacher"]

    def ce(self, logits: jax.Array) -> jax.Array:
        return losses.cross_entropy(logits, self.targets, self.loss.label_smoothing)

    def base(self, logits: jax.Array, teacher_logits: jax.Array) -> tuple[jax.Array, dict]:
        """ce_weight * CE + kd_weight * T^2 KL, and the two parts."""
        ce, kd = self.ce(logits), losses.kd_kl(logits, teacher_logits, self.loss.temperature)
        return self.loss.ce_weight * ce + self.loss.kd_weight * kd, {"ce": ce, "kd": kd}

    def warmup(self, fraction: float) -> jax.Array | float:
        """A weight that rises linearly from 0 to 1 over the first `fraction` of the run (mdistiller's
        `min(epoch / warmup, 1)` with warmup = 20 of 240 epochs is `fraction` 1/12), then stays at 1."""
        if fraction <= 0 or self.num_epochs <= 0:
            return 1.0
        return jnp.minimum(1.0, self.epoch / (fraction * self.num_epochs))

    def mapped(self, segments) -> list[jax.Array]:
        """The paired student segments, through their connectors when the method has them."""
        connectors = nnx.view(self.module.connectors, use_running_average=False, raise_if_not_found=False)
        return [connectors[j](segments[s]) if len(connectors) else segments[s] for j, (s, _) in enumerate(self.pairs)]
