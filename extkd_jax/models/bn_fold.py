"""Folding eval-mode BatchNorm into the convolution it directly follows (a cheaper frozen teacher).

``fold_batchnorm(model)`` returns a new inference-only model (``model`` itself is not modified) in which every
``conv -> BN`` pair known from the model's structure is replaced by one convolution with a bias:

    s = scale / sqrt(var + eps)                      (per output channel, float32)
    kernel' = kernel * s                             (over the kernel's last, output-channel axis)
    bias'   = (conv_bias - mean) * s + bias_bn       (conv_bias = 0 when the conv had none)

and the BN replaced by ``Identity``. The folded model's eval-mode logits and segments
(``forward_with_segments(folded, x, train=False)``) equal the original's eval-mode ones to float32 rounding.
BatchNorms that do not directly follow a convolution (the pre-activation BNs of the WRNs, the WRN's final BN)
are kept, in whatever mode the caller runs them; the folded model is meant for ``train=False`` only (a folded
pair has no batch statistics any more).

Which (conv, BN) attributes pair up comes from the model code, not from guessing:

- ``resnet.CifarResNet``: ``conv1/bn1`` (stem); ``resnet.BasicBlock``: ``conv1/bn1``, ``conv2/bn2`` and the
  projection shortcut ``short_conv/short_bn``  -> every BN folds;
- ``vgg.ConvBNReLU``: ``conv/bn``  -> every BN folds;
- ``wrn.PreActBlock``: ``conv1/bn2`` (BN-ReLU-conv1-**BN**-ReLU-conv2); its ``bn1`` and the model's final ``bn``
  follow a residual sum, not a conv, and stay;
- ``imagenet_resnet``: the stem ``conv1/bn1``, each block's ``convK/bnK`` and the ``downsample`` conv/bn;
- ``mlp.MLP``: no BatchNorm, returned as an unchanged copy.

Modules of other types (a user's registered model) are left as they are: their BatchNorms stay, run with their
running statistics, which is exact and only slower.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Identity(nnx.Module):
    """Stands where a folded BatchNorm was: returns its input unchanged."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def _known_pairs() -> dict[type, tuple[tuple[str, str], ...]]:
    from extkd_jax.models import imagenet_resnet as inet
    from extkd_jax.models.resnet import BasicBlock, CifarResNet
    from extkd_jax.models.vgg import ConvBNReLU
    from extkd_jax.models.wrn import PreActBlock

    return {
        CifarResNet: (("conv1", "bn1"),),
        BasicBlock: (("conv1", "bn1"), ("conv2", "bn2"), ("short_conv", "short_bn")),
        ConvBNReLU: (("conv", "bn"),),
        PreActBlock: (("conv1", "bn2"),),
        inet.ImageNetResNet: (("conv1", "bn1"),),
        inet.BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
        inet.Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
        inet.Downsample: (("conv", "bn"),),
    }


def _fold_pair(conv: nnx.Conv, bn: nnx.BatchNorm) -> None:
    """Fold ``bn`` (eval mode) into ``conv`` in place (``conv`` belongs to the copy)."""
    if not isinstance(conv, nnx.Conv) or not isinstance(bn, nnx.BatchNorm):
        raise TypeError(f"cannot fold {type(bn).__name__} into {type(conv).__name__}: need nnx.Conv -> nnx.BatchNorm")
    if bn.axis not in (-1, (-1,)):
        raise ValueError(f"BatchNorm axis must be -1 to fold, got {bn.axis}")
    kernel = conv.kernel[...]
    out_features = kernel.shape[-1]
    if bn.num_features != out_features:
        raise ValueError(f"BatchNorm has {bn.num_features} features but the conv outputs {out_features}")
    f32 = jnp.float32
    mean = bn.mean[...].astype(f32)
    var = bn.var[...].astype(f32)
    gamma = bn.scale[...].astype(f32) if bn.scale is not None else jnp.ones((out_features,), f32)
    beta = bn.bias[...].astype(f32) if bn.bias is not None else jnp.zeros((out_features,), f32)
    s = jax.lax.rsqrt(var + bn.epsilon) * gamma  # the same order of operations as flax's _normalize
    conv_bias = conv.bias[...].astype(f32) if conv.bias is not None else jnp.zeros((out_features,), f32)
    new_kernel = (kernel.astype(f32) * s).astype(conv.param_dtype)
    new_bias = ((conv_bias - mean) * s + beta).astype(conv.param_dtype)
    conv.kernel = nnx.Param(new_kernel)
    conv.bias = nnx.Param(new_bias)
    conv.use_bias = True


def fold_batchnorm(model: nnx.Module) -> nnx.Module:
    """A new inference-only copy of ``model`` with each conv -> BN pair folded into one biased conv.

    ``model`` is not modified. The result keeps the compute dtype (folded parameters stay float32
    ``param_dtype``), splits/merges like any model (``nnx.split`` / ``nnx.merge``, also inside ``jax.jit``) and
    must be run in eval mode (``forward_with_segments(folded, x, train=False)``). Unfolded BNs (see the module
    docstring) are kept with their running statistics.
    """
    folded = nnx.clone(model)
    known = _known_pairs()
    seen: set[int] = set()
    work = []
    for _, module in nnx.iter_modules(folded):
        for conv_name, bn_name in known.get(type(module), ()):
            conv = getattr(module, conv_name, None)
            bn = getattr(module, bn_name, None)
            if conv is None and bn is None:  # e.g. an identity shortcut
                continue
            if conv is None or bn is None:
                raise ValueError(f"{type(module).__name__}: {conv_name!r} and {bn_name!r} must both be set or unset")
            if id(conv) in seen or id(bn) in seen:
                raise ValueError(f"{type(module).__name__}: {conv_name!r}/{bn_name!r} shared with another pair")
            seen.update((id(conv), id(bn)))
            work.append((module, conv, bn, bn_name))
    for module, conv, bn, bn_name in work:  # mutate only after the walk
        _fold_pair(conv, bn)
        setattr(module, bn_name, Identity())
    return folded


__all__ = ["Identity", "fold_batchnorm"]
