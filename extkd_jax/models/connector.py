"""Connector: maps a student feature of one shape to a teacher feature's shape (FitNets / RepDistiller ConvReg).

Shapes are given without the batch axis; image features are (H, W, C) NHWC, flat features are (D,).

- equal shapes: identity, no parameters;
- rank 1, (Ds,) -> (Dt,): ``nnx.Linear`` (PyTorch default init);
- rank 3, same spatial size: 1x1 conv (no bias) + BN;
- rank 3, student spatial = f x teacher spatial (integer f, same for H and W): conv with kernel = stride = f + BN;
- rank 3, teacher spatial = f x student spatial: transposed conv with kernel = stride = f + BN;
- anything else (rank mismatch, rank not 1 or 3, non-integer or anisotropic ratio): ``ValueError``.

No ReLU after the BN: the regression target (a teacher segment) can be negative (e.g. the pre-activation WRN
group outputs), so the connector stays linear up to BN's affine. The conv bias is dropped because BN follows it.
The BN obeys ``nnx.view(..., use_running_average=...)`` like the models' BNs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from extkd_jax.models.common import batch_norm, conv, conv_transpose, linear


class Connector(nnx.Module):
    """Student feature (N, *student_shape) -> (N, *teacher_shape)."""

    def __init__(
        self,
        student_shape: Sequence[int],
        teacher_shape: Sequence[int],
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
    ):
        s = tuple(int(d) for d in student_shape)
        t = tuple(int(d) for d in teacher_shape)
        self.student_shape = s
        self.teacher_shape = t
        self.dtype = dtype
        layer: Any = None
        bn: Any = None
        if s == t:
            self.kind = "identity"
        elif len(s) == 1 and len(t) == 1:
            self.kind = "linear"
            layer = linear(s[0], t[0], rngs=rngs, dtype=dtype)
        elif len(s) == 3 and len(t) == 3:
            (sh, sw, sc), (th, tw, tc) = s, t
            if (sh, sw) == (th, tw):
                self.kind = "conv1x1"
                layer = conv(sc, tc, 1, rngs=rngs, dtype=dtype)
            elif sh % th == 0 and sw % tw == 0 and sh // th == sw // tw:
                f = sh // th
                self.kind = "strided_conv"
                layer = conv(sc, tc, f, stride=f, rngs=rngs, dtype=dtype)
            elif th % sh == 0 and tw % sw == 0 and th // sh == tw // sw:
                f = th // sh
                self.kind = "transposed_conv"
                layer = conv_transpose(sc, tc, f, stride=f, padding="VALID", rngs=rngs, dtype=dtype)
            else:
                raise ValueError(
                    f"Connector: student shape {s} and teacher shape {t} have no integer spatial ratio "
                    "(the same for H and W)"
                )
            bn = batch_norm(tc, rngs=rngs, dtype=dtype)
        else:
            raise ValueError(
                f"Connector: cannot map student shape {s} to teacher shape {t} "
                "(supported: equal shapes, rank 1 -> rank 1, rank 3 (H, W, C) -> rank 3)"
            )

        self.layer = layer
        self.bn = bn

    def __call__(self, x: jax.Array) -> jax.Array:
        if tuple(x.shape[1:]) != self.student_shape:
            raise ValueError(f"Connector expects inputs of shape (N, *{self.student_shape}), got {x.shape}")
        if self.kind == "identity":
            return x
        y = self.layer(x.astype(self.dtype))
        return y if self.bn is None else self.bn(y)
