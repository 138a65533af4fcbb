"""Pure, jittable steps: `train_step` (no teacher), `distill_step` and `eval_logits`.

A step is a function `(state, teacher_vars, images, labels, key) -> (state, metrics)` built once from static
pieces (graph definitions, the loss config, the optimizer) so nothing Python runs per step once jitted.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from extkd_jax.models import forward_with_segments
from extkd_jax.train.objectives import compute_objective
from extkd_jax.train.state import ModelParts, TrainState

StepFn = Callable[[TrainState, Any, jax.Array, jax.Array, jax.Array], tuple[TrainState, dict]]


@dataclasses.dataclass(frozen=True)
class TeacherProgram:
    """A frozen teacher: its graph, and a function of its variables giving (logits, segments) in eval mode."""

    parts: ModelParts

    @property
    def variables(self):
        return {"params": self.parts.params, "batch_stats": self.parts.batch_stats}

    def __call__(self, variables, images: jax.Array):
        model = self.parts.merge(variables["params"], variables["batch_stats"])
        logits, segments = forward_with_segments(model, images, train=False)
        return jax.lax.stop_gradient(logits), [jax.lax.stop_gradient(s) for s in segments]


def _student_forward(student_parts: ModelParts, params, batch_stats, images, key, pairs):
    """Runs student + connectors in train mode; returns logits, paired student segments, new statistics."""
    model = student_parts.merge(params, batch_stats)
    train_view = nnx.view(model, deterministic=False, use_running_average=False, raise_if_not_found=False)
    logits, segments = forward_with_segments(
        train_view.student, images, train=True, rngs=nnx.Rngs(dropout=key)
    )
    connectors = train_view.connectors
    # fitnet / extended_kd map each segment through a connector; AT compares channel-pooled maps of raw ones
    mapped = [connectors[j](segments[s]) if len(connectors) else segments[s] for j, (s, _) in enumerate(pairs)]
    new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    return logits, mapped, new_stats


def make_step(
    student_parts: ModelParts,
    loss_config,
    tx: optax.GradientTransformation,
    learning_rate_fn: optax.Schedule,
    steps_per_epoch: int,
    teacher: TeacherProgram | None = None,
    pairs: tuple[tuple[int, int], ...] = (),
    skip_nonfinite: bool = False,
) -> StepFn:
    """Builds the pure step: `train_step` when `teacher` is None, else `distill_step`."""

    def step(state: TrainState, teacher_vars, images, labels, key):
        teacher_logits, teacher_segments = None, []
        if teacher is not None:
            teacher_logits, all_teacher_segments = teacher(teacher_vars, images)
            teacher_segments = [all_teacher_segments[t] for _, t in pairs]
        epoch = state.step.astype(jnp.float32) / steps_per_epoch

        def loss_fn(params):
            logits, student_segments, new_stats = _student_forward(
                student_parts, params, state.batch_stats, images, key, pairs
            )
            total, parts = compute_objective(
                loss_config, logits, labels, teacher_logits, student_segments, teacher_segments, epoch
            )
            return total, (parts, new_stats, logits)

        (total, (parts, new_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = TrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=new_stats,
            opt_state=opt_state,
        )
        finite = jnp.isfinite(total)
        if skip_nonfinite:
            kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
            new_state = kept.replace(step=state.step + 1)
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


def make_logits_fn(parts: ModelParts, student_attr: str | None = None):
    """`(params, batch_stats, images) -> logits` in eval mode, for a model or the student inside a wrapper."""

    def logits_fn(params, batch_stats, images):
        model = parts.merge(params, batch_stats)
        if student_attr:
            model = getattr(model, student_attr)
        logits, _ = forward_with_segments(model, images, train=False)
        return logits

    return logits_fn
