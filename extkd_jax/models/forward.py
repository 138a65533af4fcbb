"""Running a model in train or eval mode with its segment outputs; counting parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def forward_with_segments(
    model: nnx.Module,
    x: jax.Array,
    *,
    train: bool,
    rngs: nnx.Rngs | None = None,
) -> tuple[jax.Array, list[jax.Array]]:
    """Run ``model`` on ``x`` and return ``(logits (N, num_classes) float32, segments)``.

    ``segments`` follow ``model.segment_names`` (each (N, ...) in the compute dtype). ``train=True`` uses batch
    statistics and updates the BatchNorm running statistics of ``model`` in place, and applies dropout (with
    ``rngs`` if given, else the model's own dropout streams); ``train=False`` uses running statistics, no dropout.
    Works eagerly and inside ``jax.jit`` (e.g. on a model rebuilt there with ``nnx.merge``).
    """
    view = nnx.view(model, deterministic=not train, use_running_average=not train, raise_if_not_found=False)
    logits, captured = nnx.capture(view, nnx.Intermediate)(x, rngs=rngs)
    segments = []
    for name in model.segment_names:
        if name not in captured:
            raise RuntimeError(f"model {type(model).__name__} did not sow segment {name!r}")
        values = captured[name].get_value()
        if len(values) != 1:
            raise RuntimeError(f"segment {name!r} was sown {len(values)} times; expected once")
        segments.append(values[0])
    return logits.astype(jnp.float32), segments


def count_params(model: nnx.Module) -> int:
    """Total number of elements in the model's ``nnx.Param`` variables (works on ``nnx.eval_shape`` models)."""
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
