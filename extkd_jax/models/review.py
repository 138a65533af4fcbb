"""ReviewKD's attention-based fusion (Chen et al. 2021, mdistiller's `ABF`): the student's stage outputs, deepest
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
