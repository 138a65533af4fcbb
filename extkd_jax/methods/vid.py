"""VID (Ahn et al. 2019): KD + the Gaussian likelihood of the teacher's paired segments under learned regressors of
the student's (`VidRegressor`, the connectors), with a learned variance per teacher channel."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from extkd_jax import losses
from extkd_jax.losses.zoo_features import match_spatial
from extkd_jax.methods.base import Build, Method
from extkd_jax.methods.context import Context
from extkd_jax.models.common import conv

VID_EPS = 1e-5  # VID's variance floor (RepDistiller's eps)


class VidRegressor(nnx.Module):
    """VID's regressor (Ahn et al. 2019, RepDistiller's form): three bias-free 1x1 convs (linear layers for vector
    features), student channels -> teacher channels -> teacher channels -> teacher channels, ReLU between them,
    predicting the mean of the teacher's feature; and `log_scale`, one learned value per teacher channel for the
    variance (``softplus(log_scale) + eps``), initialised so that the variance starts at `init_log_scale`'s."""

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        *,
        spatial: bool,
        init_log_scale: float,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
    ):
        def layer(i: int, o: int):
            if spatial:
                return conv(i, o, 1, rngs=rngs, dtype=dtype)
            return nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

        self.dtype = dtype
        self.layers = nnx.List(
            [layer(student_channels, teacher_channels), layer(teacher_channels, teacher_channels)]
            + [layer(teacher_channels, teacher_channels)]
        )
        self.log_scale = nnx.Param(jnp.full((teacher_channels,), init_log_scale, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        for k, layer in enumerate(self.layers):
            x = layer(x) if k == 0 else layer(jax.nn.relu(x))
        return x.astype(jnp.float32)


def _vid(ctx: Context):
    """KD + `loss.vid.weight` x the sum over paired segments of VID's Gaussian NLL through the regressors."""
    logits, segments = ctx.student()
    teacher_logits, teacher_segments = ctx.teacher()
    total, parts = ctx.base(logits, teacher_logits)
    extra = 0.0
    for regressor, (s, t) in zip(ctx.module.connectors, ctx.pairs, strict=True):
        student, teacher = match_spatial(segments[s], teacher_segments[t])
        extra = extra + losses.vid(regressor(student), teacher, regressor.log_scale[...], VID_EPS)
    return total + ctx.loss.vid.weight * extra, {**parts, "vid": extra}, logits


def _regressors(b: Build) -> dict:
    init = losses.vid_log_scale(b.knobs.init_variance)
    return {
        "connectors": [
            VidRegressor(
                b.student_shapes[s][-1],
                b.teacher_shapes[t][-1],
                spatial=len(b.student_shapes[s]) == 4 and len(b.teacher_shapes[t]) == 4,
                init_log_scale=init,
                rngs=b.rngs,
                dtype=b.dtype,
            )
            for s, t in b.pairs
        ]
    }


VID = Method(
    "vid",
    "VID (Ahn et al. 2019): KD + Gaussian likelihood of teacher segments under regressors",
    family="zoo",
    objective=_vid,
    knobs={"weight": 1.0, "init_variance": 5.0},  # the learned variance's starting value
    kinds={"weight": "weight", "init_variance": "positive"},
    tune="weight",
    grid=(0.1, 1.0),
    needs=frozenset({"teacher"}),
    pairing="all",
    modules=_regressors,
    zoo=True,
)
