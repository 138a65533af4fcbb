"""ReviewKD (Chen et al. 2021, mdistiller's form) on top of KD.

ReviewKD's attention-based fusion (Chen et al. 2021, mdistiller's `ABF`): the student's stage outputs, deepest
first, each mapped to a middle width, fused with the upsampled result of the stage below it by a learned two-way
attention, and mapped to the teacher's width and size; the fused maps are compared with the teacher's stages by
the hierarchical context loss (`losses.hierarchical_context`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from extkd_jax import losses
from extkd_jax.methods.base import Build, Method
from extkd_jax.methods.context import Context, pooled
from extkd_jax.models.common import batch_norm, conv

MAX_MIDDLE_CHANNELS = 512


def _resize(x: jax.Array, size: int) -> jax.Array:
    """Nearest-neighbour resize of NHWC maps to size x size (PyTorch's `interpolate(mode="nearest")`)."""
    if x.shape[1] == size and x.shape[2] == size:
        return x
    return jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), "nearest")


class AttentionFusion(nnx.Module):
    """One ABF: 1x1 conv + BN to the middle width; when `fuse`, a 1x1 conv + sigmoid gives two attention maps that
    mix it with the residual from the deeper stage; then a 3x3 conv + BN to the teacher's width."""

    def __init__(self, in_channels: int, middle: int, out_channels: int, fuse: bool, *, rngs: nnx.Rngs, dtype: Any):
        self.dtype = dtype
        self.reduce = conv(in_channels, middle, 1, rngs=rngs, dtype=dtype)
        self.reduce_bn = batch_norm(middle, rngs=rngs, dtype=dtype)
        self.attention = conv(2 * middle, 2, 1, use_bias=True, rngs=rngs, dtype=dtype) if fuse else None
        self.out = conv(middle, out_channels, 3, padding=1, rngs=rngs, dtype=dtype)
        self.out_bn = batch_norm(out_channels, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, residual: jax.Array | None, out_size: int) -> tuple[jax.Array, jax.Array]:
        """(the map for the loss, the residual for the next, shallower stage)."""
        x = self.reduce_bn(self.reduce(x.astype(self.dtype)))
        if self.attention is not None:
            residual = _resize(residual, x.shape[1])
            gates = jax.nn.sigmoid(self.attention(jnp.concatenate([x, residual], axis=-1)))
            x = x * gates[..., :1] + residual * gates[..., 1:]
        x = _resize(x, out_size)
        return self.out_bn(self.out(x)).astype(jnp.float32), x


class ReviewFusion(nnx.Module):
    """The ABF chain over the student's features (its stages, then the pooled features as a 1x1 map), built from
    the student's and the teacher's channel counts of those features."""

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int], *, rngs: nnx.Rngs, dtype: Any):
        middle = min(MAX_MIDDLE_CHANNELS, student_channels[-1])
        last = len(student_channels) - 1
        self.fusions = nnx.List(
            [
                AttentionFusion(s, middle, t, k < last, rngs=rngs, dtype=dtype)
                for k, (s, t) in enumerate(zip(student_channels, teacher_channels, strict=True))
            ]
        )

    def __call__(self, features: Sequence[jax.Array], out_sizes: Sequence[int]) -> list[jax.Array]:
        """Maps of the teacher's shapes, in the order of `features` (shallow to deep, the pooled one last)."""
        out, residual = [], None
        for k in reversed(range(len(features))):
            y, residual = self.fusions[k](features[k], residual, out_sizes[k])
            out.insert(0, y)
        return out


def _review(ctx: Context):
    """The student's paired segments and its pooled features (a 1x1 map), fused deepest first by the ABF chain
    (`Student.projector`), against the teacher's paired segments and pooled features by the hierarchical context
    loss, x `loss.reviewkd.weight`, ramped in over the first `loss.reviewkd.warmup_fraction` of the run."""
    k = ctx.loss.reviewkd
    logits, segments = ctx.student()
    teacher_logits, teacher_segments = ctx.teacher()
    kd_total, kd_parts = ctx.base(logits, teacher_logits)

    def features(maps, idx):
        return [maps[i] for i in idx] + [pooled(maps[-1])[:, None, None, :]]

    student = features(segments, [s for s, _ in ctx.pairs])
    teacher = features(teacher_segments, [t for _, t in ctx.pairs])
    fusion = nnx.view(ctx.module.projector, use_running_average=False, raise_if_not_found=False)
    review = losses.hierarchical_context(fusion(student, [t.shape[1] for t in teacher]), teacher)
    return kd_total + ctx.warmup(k.warmup_fraction) * k.weight * review, {**kd_parts, "review": review}, logits


def _fusion(b: Build) -> dict:
    if any(len(b.student_shapes[s]) != 4 or len(b.teacher_shapes[t]) != 4 for s, t in b.pairs):
        raise ValueError("loss.name='reviewkd' needs feature maps (H, W, C): a paired segment is a vector")
    student_channels = [b.student_shapes[s][-1] for s, _ in b.pairs] + [b.student_shapes[-1][-1]]
    teacher_channels = [b.teacher_shapes[t][-1] for _, t in b.pairs] + [b.teacher_shapes[-1][-1]]
    return {"projector": ReviewFusion(student_channels, teacher_channels, rngs=b.rngs, dtype=b.dtype)}


REVIEWKD = Method(
    "reviewkd",
    "ReviewKD (Chen et al. 2021): KD + attention-fused student stages vs the teacher's",
    family="zoo",
    objective=_review,
    # weight: mdistiller's default; the authors' CIFAR-100 script (CIFAR-100/script/reviewKD.sh) uses 0.6 for
    # resnet56 -> resnet20 and 5 for resnet32x4 -> resnet8x4, the grid; it ramps up over 20 of 240 epochs
    knobs={"weight": 1.0, "warmup_fraction": 20 / 240},
    kinds={"weight": "weight", "warmup_fraction": "fraction"},
    tune="weight",
    grid=(0.6, 5.0),
    needs=frozenset({"teacher", "feature_maps"}),
    pairing="all",
    modules=_fusion,
    zoo=True,
)
