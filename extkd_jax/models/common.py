"""Shared building blocks: PyTorch-matching initialisers, layer factories and the segment-sowing base class.

Initialisation follows RepDistiller (the PyTorch reference the CIFAR results come from):
- convolutions: He normal with ``fan_out`` (``kaiming_normal_(mode="fan_out", nonlinearity="relu")``), i.e.
  N(0, 2 / (kh * kw * out_channels)), untruncated;
- BatchNorm: scale 1, bias 0, momentum 0.9 (PyTorch ``momentum=0.1``), epsilon 1e-5;
- linear layers: PyTorch's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for kernel and bias (VGG overrides it).

Parameters are always float32; ``dtype`` is the compute dtype. Modules are built in inference mode (BatchNorm uses
its running statistics, dropout is off), so a plain call of a model never changes its state; training runs through
``nnx.view(model, use_running_average=False, deterministic=False)`` (see ``forward_with_segments``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


class Buffer(nnx.Variable):
    """State that is neither a trained parameter nor a statistic: CRD's memory banks (written by the step), OFD's
    margins (constants of the teacher). Checkpointed and restored with the BatchNorm statistics (`STATE`), never
    updated by the optimizer (it updates `nnx.Param` only)."""


# the variables a step carries besides the parameters: one "batch_stats" tree in TrainState and checkpoints. The
# trees are pure dicts (no variable type), so a checkpoint written while buffers were BatchStat restores unchanged.
STATE = (nnx.BatchStat, Buffer)

conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
torch_linear_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int) -> Any:
    """PyTorch's default Linear bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv(
    in_ch: int,
    out_ch: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: int = 0,
    use_bias: bool = False,
    rngs: nnx.Rngs,
    dtype: Any,
) -> nnx.Conv:
    """NHWC convolution with PyTorch-style symmetric explicit padding and He (fan_out) init."""
    return nnx.Conv(
        in_ch,
        out_ch,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        use_bias=use_bias,
        kernel_init=conv_init,
        bias_init=nnx.initializers.zeros_init(),
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def conv_transpose(
    in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, padding: str = "SAME", rngs: nnx.Rngs, dtype: Any
) -> nnx.ConvTranspose:
    """NHWC transposed convolution without bias, He (fan_out) init: upsampling connectors, FT's decoder."""
    return nnx.ConvTranspose(
        in_ch,
        out_ch,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        use_bias=False,
        kernel_init=conv_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def batch_norm(features: int, *, rngs: nnx.Rngs, dtype: Any) -> nnx.BatchNorm:
    """BatchNorm over the last axis, momentum 0.9, epsilon 1e-5, float32 statistics and parameters."""
    return nnx.BatchNorm(
        features,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        use_running_average=True,
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def linear(
    in_features: int,
    out_features: int,
    *,
    rngs: nnx.Rngs,
    dtype: Any,
    kernel_init: Any = None,
    bias_init: Any = None,
) -> nnx.Linear:
    """Dense layer with PyTorch's default init unless overridden."""
    return nnx.Linear(
        in_features,
        out_features,
        kernel_init=kernel_init if kernel_init is not None else torch_linear_kernel_init,
        bias_init=bias_init if bias_init is not None else torch_linear_bias_init(in_features),
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def global_avg_pool(x: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, C)."""
    return jnp.mean(x, axis=(1, 2))


def dropout_layer(rate: float, *, rngs: nnx.Rngs) -> nnx.Dropout:
    """Dropout, off until a view turns it on (``deterministic=False``); its stream comes from ``rngs``."""
    return nnx.Dropout(rate, deterministic=True, rngs=rngs)


class SegmentModel(nnx.Module):
    """Base class: a classifier that sows its segment outputs on itself under ``nnx.Intermediate``.

    Subclasses set ``segment_names`` and call ``self.sow_segment(name, value)`` once per segment, in order.
    Sowing is switched on by a view, ``nnx.view(model, sow_segments=True)`` (``set_view`` below, Flax's public
    hook), under ``nnx.capture`` as ``forward_with_segments`` does it; a plain call sows nothing, so calling a
    model directly never adds ``Intermediate`` variables to its state.
    """

    segment_names: tuple[str, ...] = ()
    preact_names: tuple[str, ...] = ()  # optional taps before a ReLU, one per segment (OFD reads them)
    sow_segments: bool = False

    def set_view(self, sow_segments: bool | None = None) -> None:
        """sow_segments: if True, each segment output is sown under ``nnx.Intermediate`` for ``nnx.capture``."""
        if sow_segments is not None:
            self.sow_segments = sow_segments

    def sow_segment(self, name: str, value: jax.Array) -> None:
        if self.sow_segments:
            self.sow(nnx.Intermediate, name, value)
