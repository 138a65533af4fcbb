"""ImageNet ResNets in torchvision's layout (He et al. 2016; torchvision `resnet18/34/50`, v1.5 bottlenecks).

7x7 stride-2 stem conv + BN + ReLU + 3x3 stride-2 max-pool, four stages of BasicBlocks (resnet18: 2-2-2-2,
resnet34: 3-4-6-3) or Bottlenecks (resnet50: 3-4-6-3, stride on the 3x3 conv), global average pooling, one linear
classifier. Attribute names follow torchvision's state_dict (`conv1`, `bn1`, `layer1[0].conv1`, `downsample`,
`fc`), so `models.torch_weights` maps a torchvision checkpoint onto them one to one. Initialisation as torchvision:
convs He normal (fan_out), BN scale 1 / bias 0, the classifier PyTorch's default.

Segments: the output of each stage, `layer1` .. `layer4`; for a 224x224 input (N, 56, 56, 64e), (N, 28, 28, 128e),
(N, 14, 14, 256e), (N, 7, 7, 512e) with e = 1 (basic) or 4 (bottleneck).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from extkd_jax.models.common import SegmentModel, batch_norm, conv, global_avg_pool, linear

# torchvision's names: no CIFAR ResNet has these depths (those are 6n + 2 and named resnet8 .. resnet110)
LAYOUTS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}


class Downsample(nnx.Module):
    """The projection shortcut: 1x1 conv (stride s) + BN (torchvision's `downsample.0` / `downsample.1`)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, *, rngs: nnx.Rngs, dtype: Any):
        self.conv = conv(in_ch, out_ch, 1, stride=stride, rngs=rngs, dtype=dtype)
        self.bn = batch_norm(out_ch, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x))


class BasicBlock(nnx.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int, *, rngs: nnx.Rngs, dtype: Any):
        self.conv1 = conv(in_ch, width, 3, stride=stride, padding=1, rngs=rngs, dtype=dtype)
        self.bn1 = batch_norm(width, rngs=rngs, dtype=dtype)
        self.conv2 = conv(width, width, 3, padding=1, rngs=rngs, dtype=dtype)
        self.bn2 = batch_norm(width, rngs=rngs, dtype=dtype)
        self.downsample = (
            Downsample(in_ch, width, stride, rngs=rngs, dtype=dtype) if stride != 1 or in_ch != width else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x)))))
        return nnx.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nnx.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, *, rngs: nnx.Rngs, dtype: Any):
        out_ch = width * self.expansion
        self.conv1 = conv(in_ch, width, 1, rngs=rngs, dtype=dtype)
        self.bn1 = batch_norm(width, rngs=rngs, dtype=dtype)
        self.conv2 = conv(width, width, 3, stride=stride, padding=1, rngs=rngs, dtype=dtype)
        self.bn2 = batch_norm(width, rngs=rngs, dtype=dtype)
        self.conv3 = conv(width, out_ch, 1, rngs=rngs, dtype=dtype)
        self.bn3 = batch_norm(out_ch, rngs=rngs, dtype=dtype)
        self.downsample = (
            Downsample(in_ch, out_ch, stride, rngs=rngs, dtype=dtype) if stride != 1 or in_ch != out_ch else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        out = nnx.relu(self.bn1(self.conv1(x)))
        out = nnx.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return nnx.relu(out + (x if self.downsample is None else self.downsample(x)))


class ImageNetResNet(SegmentModel):
    """Input (N, H, W, C) NHWC -> logits (N, num_classes) float32."""

    def __init__(
        self,
        num_classes: int,
        *,
        block: str,
        depths: tuple[int, ...],
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        in_channels: int = 3,
    ):
        block_type = BasicBlock if block == "basic" else Bottleneck
        self.dtype = dtype
        self.segment_names = ("layer1", "layer2", "layer3", "layer4")
        self.conv1 = conv(in_channels, 64, 7, stride=2, padding=3, rngs=rngs, dtype=dtype)
        self.bn1 = batch_norm(64, rngs=rngs, dtype=dtype)
        in_ch = 64
        for i, (width, depth) in enumerate(zip((64, 128, 256, 512), depths, strict=True)):
            blocks = []
            for j in range(depth):
                blocks.append(block_type(in_ch, width, 2 if i > 0 and j == 0 else 1, rngs=rngs, dtype=dtype))
                in_ch = width * block_type.expansion
            setattr(self, f"layer{i + 1}", nnx.List(blocks))
        self.fc = linear(in_ch, num_classes, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        del rngs  # no dropout
        x = nnx.relu(self.bn1(self.conv1(x.astype(self.dtype))))
        x = nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for name in self.segment_names:
            for block in getattr(self, name):
                x = block(x)
            self.sow_segment(name, x)
        return self.fc(global_avg_pool(x)).astype(jnp.float32)


def make_imagenet_resnet_factories() -> dict[str, Any]:
    """name -> constructor ``(num_classes, *, rngs, dtype, **kwargs)``."""

    def factory(block: str, depths: tuple[int, ...]) -> Any:
        def make(num_classes: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, **kwargs: Any) -> ImageNetResNet:
            return ImageNetResNet(num_classes, block=block, depths=depths, rngs=rngs, dtype=dtype, **kwargs)

        return make

    return {name: factory(*layout) for name, layout in LAYOUTS.items()}
