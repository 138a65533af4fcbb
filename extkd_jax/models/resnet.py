"""CIFAR ResNets (He et al. 2016, CIFAR variant; RepDistiller's ``resnet.py``).

Depth 6n+2, BasicBlocks, three stages. ``resnet{8,14,20,32,44,56,110}`` use widths stem 16 / stages 16, 32, 64;
``resnet8x4`` and ``resnet32x4`` use stem 32 / stages 64, 128, 256. The shortcut is the projection shortcut
(option B: 1x1 conv + BN) whenever the stride or the channel count changes, identity otherwise (as RepDistiller).

Segments: the output of each stage after its final ReLU, ``stage1``, ``stage2``, ``stage3``; for a 32x32 input
they are (N, 32, 32, w1), (N, 16, 16, w2), (N, 8, 8, w3).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from extkd_jax.models.common import SegmentModel, batch_norm, conv, global_avg_pool, linear


class BasicBlock(nnx.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU. (N, H, W, in_ch) -> (N, H/stride, W/stride, out_ch)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, *, rngs: nnx.Rngs, dtype: Any):
        self.conv1 = conv(in_ch, out_ch, 3, stride=stride, padding=1, rngs=rngs, dtype=dtype)
        self.bn1 = batch_norm(out_ch, rngs=rngs, dtype=dtype)
        self.conv2 = conv(out_ch, out_ch, 3, padding=1, rngs=rngs, dtype=dtype)
        self.bn2 = batch_norm(out_ch, rngs=rngs, dtype=dtype)
        if stride != 1 or in_ch != out_ch:
            self.short_conv = conv(in_ch, out_ch, 1, stride=stride, rngs=rngs, dtype=dtype)
            self.short_bn = batch_norm(out_ch, rngs=rngs, dtype=dtype)
        else:
            self.short_conv = None
            self.short_bn = None

    def pre_activation(self, x: jax.Array) -> jax.Array:
        """The block's output before its final ReLU (OFD's tap)."""
        out = nnx.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.short_conv is None else self.short_bn(self.short_conv(x))
        return out + residual

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.pre_activation(x))


class CifarResNet(SegmentModel):
    """CIFAR ResNet. Input (N, H, W, 3) NHWC -> logits (N, num_classes) float32."""

    def __init__(
        self,
        num_classes: int,
        *,
        depth: int,
        widths: tuple[int, int, int, int],
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        in_channels: int = 3,
    ):
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.dtype = dtype
        self.segment_names = ("stage1", "stage2", "stage3")
        self.preact_names = ("stage1_preact", "stage2_preact", "stage3_preact")  # before each stage's last ReLU
        self.conv1 = conv(in_channels, widths[0], 3, padding=1, rngs=rngs, dtype=dtype)
        self.bn1 = batch_norm(widths[0], rngs=rngs, dtype=dtype)
        stages = []
        in_ch = widths[0]
        for _i, (out_ch, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_ch, out_ch, stride if j == 0 else 1, rngs=rngs, dtype=dtype))
                in_ch = out_ch
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.fc = linear(in_ch, num_classes, rngs=rngs, dtype=dtype)

    def bn_before_relu(self) -> list[nnx.BatchNorm]:
        """The BN whose output precedes each pre-activation tap (the last block's bn2, as OFD's code takes it)."""
        return [stage[-1].bn2 for stage in self.stages]

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        del rngs  # no dropout
        x = x.astype(self.dtype)
        x = nnx.relu(self.bn1(self.conv1(x)))
        for name, preact_name, stage in zip(self.segment_names, self.preact_names, self.stages):
            for block in stage[:-1]:
                x = block(x)
            pre = stage[-1].pre_activation(x)
            self.sow_segment(preact_name, pre)
            x = nnx.relu(pre)
            self.sow_segment(name, x)
        return self.fc(global_avg_pool(x)).astype(jnp.float32)


_DEPTHS = {
    "resnet8": 8,
    "resnet14": 14,
    "resnet20": 20,
    "resnet32": 32,
    "resnet44": 44,
    "resnet56": 56,
    "resnet110": 110,
}


def make_resnet_factories() -> dict[str, Any]:
    """name -> constructor ``(num_classes, *, rngs, dtype, **kwargs)``."""
    out: dict[str, Any] = {}
    for name, depth in _DEPTHS.items():
        out[name] = _factory(depth, (16, 16, 32, 64))
    out["resnet8x4"] = _factory(8, (32, 64, 128, 256))
    out["resnet32x4"] = _factory(32, (32, 64, 128, 256))
    return out


def _factory(depth: int, widths: tuple[int, int, int, int]) -> Any:
    def make(num_classes: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, **kwargs: Any) -> CifarResNet:
        return CifarResNet(num_classes, depth=depth, widths=widths, rngs=rngs, dtype=dtype, **kwargs)

    return make
