"""A KD method defined outside extkd_jax: KD plus the distance between the student's and the teacher's batch
cosine-similarity matrices of their last segments (each example's pooled features compared with every other
example's, so the two networks may have different widths).

Make this file's folder importable and name the module in `config.imports`; the workdir records it, so a rerun,
`extkd evaluate` and `extkd_jax.load` import it again without a manual import:

    PYTHONPATH=. extkd reproduce --config=smoke --workdir=/tmp/cosine \\
        --config.imports="('custom_method',)" \\
        --config.reproduce.methods="('kd', 'cosine_kd')" --config.reproduce.primary="('cosine_kd', 'kd')"

Its knob is `loss.cosine_kd.weight` (filled in at its default, 1.0, when the config is checked); `extkd reproduce`
tunes it over its declared grid (0.5, 2.0) unless `reproduce.grid.cosine_kd` is given.
"""

from __future__ import annotations

import jax.numpy as jnp

import extkd_jax
from extkd_jax.methods import Context, Method, pooled


def cosine_similarities(features: jnp.ndarray) -> jnp.ndarray:
    """(N, N) cosine similarities between the rows of (N, D) features."""
    unit = features / jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), 1e-8)
    return unit @ unit.T


def cosine_kd(ctx: Context):
    """ce_weight x CE + kd_weight x T^2 KL + weight x mean squared difference of the two similarity matrices."""
    logits, segments = ctx.student()
    teacher_logits, teacher_segments = ctx.teacher()
    total, parts = ctx.base(logits, teacher_logits)
    student = cosine_similarities(pooled(segments[-1]))
    teacher = cosine_similarities(pooled(teacher_segments[-1]))
    cosine = jnp.mean(jnp.square(student - teacher))
    return total + ctx.loss.cosine_kd.weight * cosine, {**parts, "cosine": cosine}, logits


COSINE_KD = extkd_jax.register_method(
    Method(
        "cosine_kd",
        "KD + the batch cosine-similarity matrices of the last segments (a plug-in: examples/custom_method.py)",
        family="plug-in",
        objective=cosine_kd,
        knobs={"weight": 1.0},
        kinds={"weight": "weight"},
        tune="weight",
        grid=(0.5, 2.0),
        needs=frozenset({"teacher"}),
    )
)
