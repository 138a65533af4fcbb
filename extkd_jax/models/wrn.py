"""Wide ResNets (Zagoruyko & Komodakis 2016; RepDistiller's ``wrn.py``): pre-activation blocks, 3 groups.

``wrn_{depth}_{k}``: n = (depth - 4) / 6 blocks per group, widths 16k, 32k, 64k after a 16-channel stem conv.
When a block changes the channel count its shortcut is a 1x1 conv (no BN) applied to the activated input.
Optional hidden dropout between the two convs of each block: kwarg ``dropout`` (default 0.0).

Segments: the raw (pre-activation) output of each group, ``group1``, ``group2``, ``group3``; for a 32x32 input
they are (N, 32, 32, 16k), (N, 16, 16, 32k), (N, 8, 8, 64k).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from extkd_jax.models.common import SegmentModel, batch_norm, conv, dropout_layer, global_avg_pool, linear


class PreActBlock(nnx.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 + shortcut. (N, H, W, in) -> (N, H/stride, W/stride, out)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float, *, rngs: nnx.Rngs, dtype: Any):
        self.bn1 = batch_norm(in_ch, rngs=rngs, dtype=dtype)
        self.conv1 = conv(in_ch, out_ch, 3, stride=stride, padding=1, rngs=rngs, dtype=dtype)
        self.bn2 = batch_norm(out_ch, rngs=rngs, dtype=dtype)
        self.dropout = dropout_layer(dropout, rngs=rngs)
        self.conv2 = conv(out_ch, out_ch, 3, padding=1, rngs=rngs, dtype=dtype)
        self.equal_in_out = in_ch == out_ch and stride == 1
        self.short_conv = None if self.equal_in_out else conv(in_ch, out_ch, 1, stride=stride, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        act = nnx.relu(self.bn1(x))
        out = nnx.relu(self.bn2(self.conv1(act)))
        out = self.conv2(self.dropout(out, rngs=rngs))
        shortcut = x if self.short_conv is None else self.short_conv(act)
        return out + shortcut


class WideResNet(SegmentModel):
    """WRN-depth-k. Input (N, H, W, 3) NHWC -> logits (N, num_classes) float32."""

    def __init__(
        self,
        num_classes: int,
        *,
        depth: int,
        widen_factor: int,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        dropout: float = 0.0,
        in_channels: int = 3,
    ):
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.dtype = dtype
        self.segment_names = ("group1", "group2", "group3")
        self.conv1 = conv(in_channels, 16, 3, padding=1, rngs=rngs, dtype=dtype)
        groups = []
        in_ch = 16
        for out_ch, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for j in range(n):
                blocks.append(PreActBlock(in_ch, out_ch, stride if j == 0 else 1, dropout, rngs=rngs, dtype=dtype))
                in_ch = out_ch
            groups.append(nnx.List(blocks))
        self.groups = nnx.List(groups)
        self.bn = batch_norm(in_ch, rngs=rngs, dtype=dtype)
        self.fc = linear(in_ch, num_classes, rngs=rngs, dtype=dtype, bias_init=nnx.initializers.zeros_init())

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        x = self.conv1(x.astype(self.dtype))
        for name, group in zip(self.segment_names, self.groups):
            for block in group:
                x = block(x, rngs=rngs)
            self.sow_segment(name, x)
        x = nnx.relu(self.bn(x))
        return self.fc(global_avg_pool(x)).astype(jnp.float32)


def make_wrn_factories() -> dict[str, Any]:
    """name -> constructor ``(num_classes, *, rngs, dtype, **kwargs)``."""

    def factory(depth: int, k: int) -> Any:
        def make(num_classes: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, **kwargs: Any) -> WideResNet:
            return WideResNet(num_classes, depth=depth, widen_factor=k, rngs=rngs, dtype=dtype, **kwargs)

        return make

    return {"wrn_16_2": factory(16, 2), "wrn_40_1": factory(40, 1), "wrn_40_2": factory(40, 2)}
