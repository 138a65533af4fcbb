"""The training objective of a run: the registered method of `loss.name` (extkd_jax.methods), a function of a
`Context` that runs the networks it needs on the inputs it needs (clean, mixed, adversarial, sampled, rotated) and
returns (total, unweighted parts, the student's logits). What each method computes: its file in extkd_jax/methods/
and docs/methods.md. This module names no method."""

from __future__ import annotations

import jax
from flax import nnx

from extkd_jax.methods import get_method
from extkd_jax.methods.context import Context, pooled  # noqa: F401 - the objectives' interface
from extkd_jax.methods.samples import boundary_samples, sampled_images  # noqa: F401
from extkd_jax.models import forward_with_segments


def objective(ctx: Context) -> tuple[jax.Array, dict, jax.Array]:
    """(total, unweighted parts, the student's logits on the batch) of `ctx.loss.name`."""
    return get_method(ctx.loss.name).objective(ctx)


def run_student_fn(module, normalize, key, taps: str = "segments"):
    """pixel images -> (logits, segments or pre-activation taps) of the student model in train mode (dropout keys
    from `key`)."""
    calls = {"n": 0}

    def run(images):
        calls["n"] += 1  # each call its own dropout stream; the first one `key` itself
        rngs = nnx.Rngs(dropout=key if calls["n"] == 1 else jax.random.fold_in(key, calls["n"]))
        return forward_with_segments(module.model, normalize(images), train=True, rngs=rngs, taps=taps)

    return run
