"""Hinton et al. (2015) MNIST MLP: flatten, [Linear-ReLU-Dropout] per hidden layer, Linear classifier.

Kwargs: ``hidden_sizes=(1200, 1200)``, ``dropout=0.0`` (after each hidden ReLU), ``input_dropout=0.0`` (on the
flattened input), ``input_size=784`` (NNX needs it at construction; a call whose flattened input has another size
raises ``ValueError``). Hinton's teacher used input_dropout=0.2, dropout=0.5.

Segments: the post-ReLU activation of each hidden layer (before its dropout), ``hidden1``, ``hidden2``, ...,
each of shape (N, h).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from extkd_jax.models.common import SegmentModel, dropout_layer, linear


class MLP(SegmentModel):
    """Input (N, ...) flattened to (N, input_size) -> logits (N, num_classes) float32."""

    def __init__(
        self,
        num_classes: int,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        hidden_sizes: Sequence[int] = (1200, 1200),
        dropout: float = 0.0,
        input_dropout: float = 0.0,
        input_size: int | None = 784,
    ):
        if input_size is None:
            input_size = 784
        hidden_sizes = tuple(int(h) for h in hidden_sizes)
        if not hidden_sizes:
            raise ValueError("MLP needs at least one hidden layer")
        self.dtype = dtype
        self.input_size = int(input_size)
        self.segment_names = tuple(f"hidden{i + 1}" for i in range(len(hidden_sizes)))
        self.input_dropout = dropout_layer(input_dropout, rngs=rngs)
        layers = []
        dropouts = []
        in_features = self.input_size
        for h in hidden_sizes:
            layers.append(linear(in_features, h, rngs=rngs, dtype=dtype))
            dropouts.append(dropout_layer(dropout, rngs=rngs))
            in_features = h
        self.hidden = nnx.List(layers)
        self.dropouts = nnx.List(dropouts)
        self.out = linear(in_features, num_classes, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        in_shape = x.shape
        x = x.reshape(in_shape[0], -1)
        if x.shape[1] != self.input_size:
            raise ValueError(
                f"MLP was built with input_size={self.input_size} but the input flattens to {x.shape[1]} features "
                f"(input shape {in_shape}); pass input_size={x.shape[1]} to create_model"
            )
        x = self.input_dropout(x.astype(self.dtype), rngs=rngs)
        for name, layer, drop in zip(self.segment_names, self.hidden, self.dropouts):
            x = nnx.relu(layer(x))
            self.sow_segment(name, x)
            x = drop(x, rngs=rngs)
        return self.out(x).astype(jnp.float32)


def make_mlp_factories() -> dict[str, Any]:
    """name -> constructor ``(num_classes, *, rngs, dtype, **kwargs)``."""

    def make(num_classes: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, **kwargs: Any) -> MLP:
        return MLP(num_classes, rngs=rngs, dtype=dtype, **kwargs)

    return {"mlp": make}
