"""Running a model in train or eval mode and reading its segment outputs (public Flax API only)."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
from flax import nnx

TAPS = ("segments", "preact")


def _accepts_rngs(model: nnx.Module) -> bool:
    return "rngs" in inspect.signature(type(model).__call__).parameters


def forward_with_segments(
    model: nnx.Module,
    x: jax.Array,
    *,
    train: bool,
    rngs: nnx.Rngs | None = None,
    taps: str = "segments",
) -> tuple[jax.Array, list[jax.Array]]:
    """Run ``model`` on ``x`` and return ``(logits (N, num_classes) float32, segments)``.

    ``segments`` follow ``model.segment_names`` (each (N, ...) in the compute dtype), read with ``nnx.capture``
    from what the model sows under ``nnx.Intermediate`` (our models sow when viewed with ``sow_segments=True``;
    a user's model may sow always). ``train=True`` uses batch statistics and updates the BatchNorm running
    statistics of ``model`` in place, and applies dropout (with ``rngs`` if given, else the model's own dropout
    streams); ``train=False`` uses running statistics, no dropout. Works eagerly and inside ``jax.jit``.
    ``taps="preact"`` returns the model's pre-activation taps (``model.preact_names``) instead of its segments.
    """
    if taps not in TAPS:
        raise ValueError(f"taps={taps!r}; expected one of {TAPS}")
    names = getattr(model, "segment_names" if taps == "segments" else "preact_names", ())
    if taps == "preact" and not names:
        raise ValueError(
            f"model {type(model).__name__} sows no pre-activation taps (preact_names); the CIFAR ResNets do"
        )
    view = nnx.view(
        model, deterministic=not train, use_running_average=not train, sow_segments=True, raise_if_not_found=False
    )
    kwargs = {"rngs": rngs} if rngs is not None and _accepts_rngs(model) else {}
    logits, captured = nnx.capture(view, nnx.Intermediate)(x, **kwargs)
    segments = []
    for name in names:
        if name not in captured:
            raise RuntimeError(
                f"model {type(model).__name__} did not sow segment {name!r} "
                "(self.sow(nnx.Intermediate, name, value) in its __call__)"
            )
        values = captured[name].get_value()
        if len(values) != 1:
            raise RuntimeError(f"segment {name!r} was sown {len(values)} times; expected once")
        segments.append(values[0])
    return logits.astype(jnp.float32), segments
