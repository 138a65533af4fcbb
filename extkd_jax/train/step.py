"""The training step in one place: forward with segments, the objective, the update and the metrics.

A step is the pure function ``step(state, teacher_variables, images, labels, key) -> (state, metrics)`` made by
``make_train_step`` from static pieces (graph definitions, the loss config, the optimizer), so nothing in Python
runs per step once it is jitted. ``images`` are pixel values (uint8, or float after augmentation); each network
normalises them with its own statistics (the student with those of its training set, the teacher with those it was
trained with), so teacher and student see the same images, each as it was taught to.

| loss.name   | total                                                                             |
|-------------|-----------------------------------------------------------------------------------|
| ce          | ce                                                                                |
| kd          | ce_weight * ce + kd_weight * T^2 KL                                               |
| fitnet      | ce_weight * ce + kd_weight * T^2 KL + segment_weight * MSE(one middle segment)    |
| extended_kd | ce_weight * ce + kd_weight * T^2 KL + segment_weight * sum_k MSE(segment k)       |
| at          | ce_weight * ce + kd_weight * T^2 KL + segment_weight * AT(segments)               |
| dkd         | ce_weight * ce + min(1, epoch / dkd_warmup_epochs) * DKD(alpha, beta, T)          |

Every part is also returned unweighted, for the metrics log.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from extkd_jax import losses
from extkd_jax.models import forward_with_segments

LOSS_NAMES = ("ce", "kd", "fitnet", "extended_kd", "at", "dkd")
SEGMENT_LOSSES = ("fitnet", "extended_kd", "at")
TEACHER_LOSSES = ("kd", "fitnet", "extended_kd", "at", "dkd")

StepFn = Callable[..., tuple["TrainState", dict]]


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: the step count, the trained parameters, BatchNorm statistics, optimizer state."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class Graph:
    """A model without its arrays: ``merge(variables)`` rebuilds the NNX module (inside ``jit`` too).

    ``rest`` is the constant state that is neither trained nor a statistic (dropout RNG streams).
    """

    graphdef: Any
    rest: Any

    def merge(self, variables: dict) -> nnx.Module:
        return nnx.merge(self.graphdef, variables["params"], variables["batch_stats"], self.rest)


def split(model: nnx.Module) -> tuple[Graph, dict]:
    """(Graph, {"params", "batch_stats"} as pure dicts): what checkpoints and optimizers take as they are."""
    graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    return Graph(graphdef, rest), {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(batch_stats)}


class Student(nnx.Module):
    """What the optimizer updates: the student model and the modules its loss adds (one connector per pair)."""

    def __init__(self, model: nnx.Module, connectors: Sequence[nnx.Module] = ()):
        self.model = model
        self.connectors = nnx.List(list(connectors))


def normalize(images: jax.Array, mean: Any, std: Any, dtype: Any) -> jax.Array:
    """Pixel values -> ``(x - mean) / std`` per channel, computed in float32, returned in ``dtype``."""
    x = (jnp.asarray(images).astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x.astype(dtype)


@dataclasses.dataclass(frozen=True)
class Network:
    """A trained network ready to run: its graph, its input normalisation and compute dtype."""

    graph: Graph
    mean: np.ndarray
    std: np.ndarray
    dtype: Any

    def outputs(self, variables: dict, images: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None):
        """(float32 logits, segments) of pixel-valued images."""
        model = self.graph.merge(variables)
        return forward_with_segments(model, normalize(images, self.mean, self.std, self.dtype), train=train, rngs=rngs)

    def frozen_outputs(self, variables: dict, images: jax.Array):
        """The teacher as a plain function of its variables: eval mode, no gradient into either output."""
        logits, segments = self.outputs(variables, images)
        return jax.lax.stop_gradient(logits), [jax.lax.stop_gradient(s) for s in segments]

    def logits(self, variables: dict, images: jax.Array) -> jax.Array:
        return self.outputs(variables, images)[0]


# ------------------------------------------------------------------------------------------------- objective


def objective(
    loss_config,
    logits: jax.Array,
    labels: jax.Array,
    teacher_logits: jax.Array | None = None,
    student_segments: Sequence[jax.Array] = (),
    teacher_segments: Sequence[jax.Array] = (),
    epoch: jax.Array | float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total, unweighted parts) of ``loss_config.name``; segments are already paired and through connectors."""
    name = loss_config.name
    ce = losses.cross_entropy(logits, labels, loss_config.label_smoothing)
    if name == "ce":
        return ce, {"ce": ce}
    temperature = loss_config.temperature
    if name in ("fitnet", "extended_kd"):
        return losses.extended_kd_loss(
            logits,
            teacher_logits,
            labels,
            list(student_segments),
            list(teacher_segments),
            temperature=temperature,
            ce_weight=loss_config.ce_weight,
            kd_weight=loss_config.kd_weight,
            segment_weight=loss_config.segment_weight,
            label_smoothing=loss_config.label_smoothing,
        )
    if name == "dkd":
        decoupled = losses.dkd(logits, teacher_logits, labels, loss_config.dkd_alpha, loss_config.dkd_beta, temperature)
        warmup = loss_config.dkd_warmup_epochs
        ramp = jnp.minimum(1.0, jnp.asarray(epoch, jnp.float32) / warmup) if warmup > 0 else 1.0
        return loss_config.ce_weight * ce + ramp * decoupled, {"ce": ce, "dkd": decoupled}
    kd = losses.kd_kl(logits, teacher_logits, temperature)
    total = loss_config.ce_weight * ce + loss_config.kd_weight * kd
    if name == "kd":
        return total, {"ce": ce, "kd": kd}
    if name == "at":
        at = losses.attention_transfer(list(student_segments), list(teacher_segments), p=loss_config.at_p)
        return total + loss_config.segment_weight * at, {"ce": ce, "kd": kd, "at": at}
    raise ValueError(f"loss.name={name!r}; expected one of {LOSS_NAMES}")


# ------------------------------------------------------------------------------------------------------- step


def make_train_step(
    student: Network,
    loss_config,
    tx: optax.GradientTransformation,
    learning_rate_fn: optax.Schedule,
    steps_per_epoch: int,
    teacher: Network | None = None,
    pairs: tuple[tuple[int, int], ...] = (),
    skip_nonfinite: bool = False,
) -> StepFn:
    """The pure step; without a teacher the objective must be ``ce``. ``pairs``: (student, teacher) segments."""

    def step(state: TrainState, teacher_variables, images, labels, key):
        teacher_logits, teacher_segments = None, []
        if teacher is not None:
            teacher_logits, all_segments = teacher.frozen_outputs(teacher_variables, images)
            teacher_segments = [all_segments[t] for _, t in pairs]
        epoch = state.step.astype(jnp.float32) / steps_per_epoch

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            module = student.graph.merge(variables)  # a Student: model + connectors
            x = normalize(images, student.mean, student.std, student.dtype)
            logits, segments = forward_with_segments(module.model, x, train=True, rngs=nnx.Rngs(dropout=key))
            connectors = nnx.view(module.connectors, use_running_average=False, raise_if_not_found=False)
            # fitnet / extended_kd map each segment through its connector; AT compares raw (channel-pooled) maps
            paired = [connectors[j](segments[s]) if len(connectors) else segments[s] for j, (s, _) in enumerate(pairs)]
            total, parts = objective(loss_config, logits, labels, teacher_logits, paired, teacher_segments, epoch)
            new_stats = nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))
            return total, (parts, new_stats, logits)

        (total, (parts, new_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = TrainState(state.step + 1, optax.apply_updates(state.params, updates), new_stats, opt_state)
        finite = jnp.isfinite(total)
        if skip_nonfinite:  # keep the old state, count the step
            new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
            new_state = new_state.replace(step=state.step + 1)
        metrics = {
            "loss": total,
            **parts,
            "accuracy": jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32)),
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": jnp.asarray(learning_rate_fn(state.step), jnp.float32),
            "nonfinite": (~finite).astype(jnp.float32),
        }
        return new_state, metrics

    return step
