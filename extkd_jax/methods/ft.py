"""Factor transfer (Kim et al. 2018) as RepDistiller runs it, on the last segments: a paraphraser learns to
reconstruct the teacher's map in an init stage; then KD + the factor transfer loss between the student's
translator and the frozen paraphraser's code.

Factor transfer's trainable parts (Kim et al. 2018, RepDistiller's `Paraphraser` / `Translator`): 3x3 conv
stacks with LeakyReLU(0.1) that turn a feature map into a "factor" with `rate` x the teacher's channels.

Choice (ours): the paraphraser's convs have no bias. It is trained in the init stage and then frozen (no gradient),
but the optimizer's weight decay still scales its weights down; without biases the network is positively
homogeneous, so the scaling leaves its L2-normalised factors unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from extkd_jax import losses
from extkd_jax.methods.base import Build, Method
from extkd_jax.methods.context import Context
from extkd_jax.models.common import batch_norm, conv, conv_transpose


def _leaky(x: jax.Array) -> jax.Array:
    return jax.nn.leaky_relu(x, 0.1)


class Paraphraser(nnx.Module):
    """Teacher side: an encoder (C -> C -> rate C -> rate C) whose output is the teacher's factor, and a decoder
    (transposed convs back to C) that reconstructs the teacher's feature map in the init stage."""

    def __init__(self, channels: int, rate: float, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        code = max(1, int(channels * rate))
        self.dtype = dtype
        self.encoder = nnx.List(
            [
                conv(i, o, 3, padding=1, rngs=rngs, dtype=dtype)
                for i, o in ((channels, channels), (channels, code), (code, code))
            ]
        )
        self.decoder = nnx.List(
            [
                conv_transpose(i, o, 3, rngs=rngs, dtype=dtype)
                for i, o in ((code, code), (code, channels), (channels, channels))
            ]
        )

    def encode(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        for layer in self.encoder:
            x = _leaky(layer(x))
        return x

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(factor code, reconstruction), both float32."""
        code = self.encode(x)
        y = code
        for layer in self.decoder:
            y = _leaky(layer(y))
        return code.astype(jnp.float32), y.astype(jnp.float32)


class Translator(nnx.Module):
    """Student side: three 3x3 convs with BN and LeakyReLU(0.1), student channels -> student channels -> rate x the
    teacher's channels -> the same; its output is the student's factor."""

    def __init__(
        self, student_channels: int, teacher_channels: int, rate: float, *, rngs: nnx.Rngs, dtype: Any = jnp.float32
    ):
        code = max(1, int(teacher_channels * rate))
        self.dtype = dtype
        widths = ((student_channels, student_channels), (student_channels, code), (code, code))
        self.convs = nnx.List([conv(i, o, 3, padding=1, rngs=rngs, dtype=dtype) for i, o in widths])
        self.bns = nnx.List([batch_norm(o, rngs=rngs, dtype=dtype) for _, o in widths])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        for layer, bn in zip(self.convs, self.bns, strict=True):
            x = _leaky(bn(layer(x)))
        return x.astype(jnp.float32)


def _ft(ctx: Context):
    """For the first `loss.ft.init_epochs` epochs only the paraphraser learns, to reconstruct the teacher's map
    (MSE); then KD + `loss.ft.weight` x the factor transfer loss between the translator's output and the
    paraphraser's code, the paraphraser frozen (no gradient)."""
    k = ctx.loss.ft
    logits, segments = ctx.student()
    teacher_logits, teacher_segments = ctx.teacher()
    kd_total, kd_parts = ctx.base(logits, teacher_logits)
    ((s, t),) = ctx.pairs
    teacher_map = jax.lax.stop_gradient(teacher_segments[t].astype(jnp.float32))
    code, reconstruction = ctx.module.projector(teacher_map)
    rebuild = jnp.mean(jnp.square(reconstruction - teacher_map))
    translator = nnx.view(ctx.module.connectors[0], use_running_average=False, raise_if_not_found=False)
    ft = losses.factor_transfer(translator(segments[s]), jax.lax.stop_gradient(code))
    total = jnp.where(ctx.epoch < k.init_epochs, rebuild, kd_total + k.weight * ft)
    return total, {**kd_parts, "ft": ft, "reconstruction": rebuild}, logits


def _modules(b: Build) -> dict:
    ((s, t),) = b.pairs
    if len(b.student_shapes[s]) != 4 or len(b.teacher_shapes[t]) != 4:
        raise ValueError("loss.name='ft' needs feature maps (H, W, C): a segment of student or teacher is a vector")
    rate, (student, teacher) = b.knobs.rate, (b.student_shapes[s][-1], b.teacher_shapes[t][-1])
    return {
        "connectors": [Translator(student, teacher, rate, rngs=b.rngs, dtype=b.dtype)],
        "projector": Paraphraser(teacher, rate, rngs=b.rngs, dtype=b.dtype),
    }


FT = Method(
    "ft",
    "factor transfer (Kim et al. 2018): KD + factors of a translator against a paraphraser's",
    family="zoo",
    objective=_ft,
    # weight: after its init stage (the paraphraser's, init_epochs); rate: the factor's channels, as a fraction of
    # the teacher's last segment's
    knobs={"weight": 200.0, "rate": 0.5, "init_epochs": 1.0},
    kinds={"weight": "weight", "rate": "positive", "init_epochs": "nonnegative"},
    tune="weight",
    grid=(20.0, 200.0),
    needs=frozenset({"teacher", "feature_maps"}),
    pairing="last",
    modules=_modules,
    zoo=True,
)
