"""CIFAR VGG with BatchNorm (RepDistiller's ``vgg.py``).

Five blocks of conv3x3(+bias)-BN-ReLU layers; ``vgg8`` cfg [[64], [128], [256], [512], [512]], ``vgg13``
[[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]. A 2x2 max-pool follows blocks 0, 1 and 2 (and block 3
only for inputs of height 64, as RepDistiller), then global average pooling and one linear classifier.
Init as RepDistiller: convs He normal (fan_out), bias 0; classifier N(0, 0.01), bias 0.

Segments: the post-ReLU output of each of the five blocks, ``block0`` .. ``block4``; for a 32x32 input they are
(N, 32, 32, c0), (N, 16, 16, c1), (N, 8, 8, c2), (N, 4, 4, c3), (N, 4, 4, c4) with c = 64, 128, 256, 512, 512.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from extkd_jax.models.common import SegmentModel, batch_norm, conv, global_avg_pool, linear

VGG_CFGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


class ConvBNReLU(nnx.Module):
    """conv3x3 (with bias) - BN - ReLU, spatial size kept."""

    def __init__(self, in_ch: int, out_ch: int, *, rngs: nnx.Rngs, dtype: Any):
        self.conv = conv(in_ch, out_ch, 3, padding=1, use_bias=True, rngs=rngs, dtype=dtype)
        self.bn = batch_norm(out_ch, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.bn(self.conv(x)))


def _max_pool(x: jax.Array) -> jax.Array:
    return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))


class VGG(SegmentModel):
    """CIFAR VGG-BN. Input (N, H, W, 3) NHWC -> logits (N, num_classes) float32."""

    def __init__(
        self,
        num_classes: int,
        *,
        cfg: tuple[tuple[int, ...], ...],
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        in_channels: int = 3,
    ):
        self.dtype = dtype
        self.segment_names = tuple(f"block{i}" for i in range(len(cfg)))
        blocks = []
        in_ch = in_channels
        for block_cfg in cfg:
            layers = []
            for out_ch in block_cfg:
                layers.append(ConvBNReLU(in_ch, out_ch, rngs=rngs, dtype=dtype))
                in_ch = out_ch
            blocks.append(nnx.List(layers))
        self.blocks = nnx.List(blocks)
        self.classifier = linear(
            in_ch,
            num_classes,
            rngs=rngs,
            dtype=dtype,
            kernel_init=nnx.initializers.normal(0.01),
            bias_init=nnx.initializers.zeros_init(),
        )

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        del rngs  # no dropout
        height = x.shape[1]
        x = x.astype(self.dtype)
        for i, (name, block) in enumerate(zip(self.segment_names, self.blocks)):
            for layer in block:
                x = layer(x)
            self.sow_segment(name, x)
            if i < 3 or (i == 3 and height == 64):
                x = _max_pool(x)
        return self.classifier(global_avg_pool(x)).astype(jnp.float32)


def make_vgg_factories() -> dict[str, Any]:
    """name -> constructor ``(num_classes, *, rngs, dtype, **kwargs)``."""

    def factory(cfg: tuple[tuple[int, ...], ...]) -> Any:
        def make(num_classes: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, **kwargs: Any) -> VGG:
            return VGG(num_classes, cfg=cfg, rngs=rngs, dtype=dtype, **kwargs)

        return make

    return {"vgg8": factory(VGG_CFGS["vgg8"]), "vgg13": factory(VGG_CFGS["vgg13"])}
