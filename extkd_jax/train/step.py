"""The training step in one place: forward with segments, the objective, the update and the metrics.

A step is the pure function ``step(state, teacher_variables, images, labels, key, indices=None) -> (state, metrics)``
(``indices``: the batch's positions in the transfer set, where the pipeline knows them; CRD's memory needs them) made by
``make_train_step`` from static pieces (graph definitions, the loss config, the optimizer), so nothing in Python
runs per step once it is jitted. ``images`` are pixel values (uint8, or float after augmentation); each network
normalises them with its own statistics (the student with those of its training set, the teacher with those it was
trained with), so teacher and student see the same images, each as it was taught to. A batch-level mix
(`data.augment` "+mixup" / "+cutmix") happens here, before both networks, and turns the labels into soft targets.
The objectives themselves (what each `loss.name` computes) are the methods' (extkd_jax/methods, by registry).
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

from extkd_jax.data.mixing import cutmix, mixup
from extkd_jax.methods import get_method
from extkd_jax.models import forward_with_segments
from extkd_jax.models.common import STATE
from extkd_jax.train import objectives

StepFn = Callable[..., tuple["TrainState", dict]]


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: the step count, the trained parameters, the other state (`batch_stats`: BatchNorm
    statistics and buffers, `models.common.STATE`), the optimizer state."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class Graph:
    """A model without its arrays: ``merge(variables)`` rebuilds the NNX module (inside ``jit`` too).

    ``rest`` is the constant state, neither trained nor carried by the step (dropout RNG streams, CRD's grouping).
    """

    graphdef: Any
    rest: Any

    def merge(self, variables: dict) -> nnx.Module:
        return nnx.merge(self.graphdef, variables["params"], variables["batch_stats"], self.rest)


def split(model: nnx.Module) -> tuple[Graph, dict]:
    """(Graph, {"params", "batch_stats"} as pure dicts): what checkpoints and optimizers take as they are.
    `batch_stats` holds every variable of `models.common.STATE` (statistics and buffers)."""
    graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, STATE, ...)
    return Graph(graphdef, rest), {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(batch_stats)}


class Student(nnx.Module):
    """What the optimizer updates: the student model and the modules its loss adds: one connector per segment pair
    (fitnet, extended_kd, mtkd_ssr, ab, fsp; vid's regressors; ft's translator), heads on its stages (mtkd_ssr), a
    projector (amkd's embedding, pfkd's feature match, ssd_kd's rotation head; ft's paraphraser; reviewkd's fusion
    chain; crd's embedding heads and memory banks)."""

    def __init__(
        self,
        model: nnx.Module,
        connectors: Sequence[nnx.Module] = (),
        heads: Sequence[nnx.Module] = (),
        projector: nnx.Module | None = None,
    ):
        self.model = model
        self.connectors = nnx.List(list(connectors))
        self.heads = nnx.List(list(heads))
        self.projector = projector


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
    taps: str = "segments"  # what `outputs` returns beside the logits: "segments" or "preact" (OFD's teacher)

    def outputs(self, variables: dict, images: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None):
        """(float32 logits, segments, or the pre-activation taps) of pixel-valued images."""
        model = self.graph.merge(variables)
        x = normalize(images, self.mean, self.std, self.dtype)
        return forward_with_segments(model, x, train=train, rngs=rngs, taps=self.taps)

    def frozen_outputs(self, variables: dict, images: jax.Array):
        """The teacher as a plain function of its variables: eval mode, no gradient into either output."""
        logits, segments = self.outputs(variables, images)
        return jax.lax.stop_gradient(logits), [jax.lax.stop_gradient(s) for s in segments]

    def logits(self, variables: dict, images: jax.Array) -> jax.Array:
        return self.outputs(variables, images)[0]


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
    mix: str = "none",
    num_classes: int = 0,
    num_epochs: float = 0.0,
) -> StepFn:
    """The pure step; without a teacher the objective must be `ce` or `purf`. `pairs`: (student, teacher)
    segments; `mix`: "none", "mixup" or "cutmix" (with `loss.mix_alpha`); `num_epochs`: the run's length, for the
    warm-ups that methods give as a share of it."""
    mixers = {"mixup": mixup, "cutmix": cutmix}
    needs = get_method(loss_config.name).needs
    taps = "preact" if "preact" in needs else "segments"

    def step(state: TrainState, teacher_variables, images, labels, key, indices=None):
        mix_key, objective_key, dropout_key = (
            jax.random.split(key, 3) if mix != "none" or "randomness" in needs else (None, key, key)
        )
        if "sampling" in needs:  # it draws (CRD's negatives) with the objective's key: dropout gets its own
            dropout_key = jax.random.fold_in(key, 1)
        images = jnp.asarray(images, jnp.float32)
        targets = jax.nn.one_hot(labels, num_classes)
        if mix != "none":
            images, targets, _, _ = mixers[mix](mix_key, images, targets, loss_config.mix_alpha)
        epoch = state.step.astype(jnp.float32) / steps_per_epoch
        run_teacher = None if teacher is None else (lambda x: teacher.frozen_outputs(teacher_variables, x))
        teacher_logits_fn = None if teacher is None else (lambda x: teacher.logits(teacher_variables, x))

        def loss_fn(params):
            module = student.graph.merge({"params": params, "batch_stats": state.batch_stats})
            run = objectives.run_student_fn(
                module, lambda x: normalize(x, student.mean, student.std, student.dtype), dropout_key, taps
            )
            ctx = objectives.Context(
                loss_config,
                images,
                labels,
                targets,
                objective_key,
                epoch,
                module,
                pairs,
                run,
                run_teacher,
                teacher_logits_fn,
                indices,
                num_epochs,
            )
            total, parts, logits = objectives.objective(ctx)
            return total, (parts, nnx.to_pure_dict(nnx.state(module, STATE)), logits)

        (total, (parts, new_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = TrainState(state.step + 1, optax.apply_updates(state.params, updates), new_stats, opt_state)
        finite = jnp.isfinite(total)
        if skip_nonfinite:  # keep the old parameters and statistics; the step and schedule counters advance
            new_state = jax.tree.map(
                lambda new, old: new if jnp.issubdtype(new.dtype, jnp.integer) else jnp.where(finite, new, old),
                new_state,
                state,
            )
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
