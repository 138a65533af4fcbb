"""Model registry: ``create_model(name, num_classes, *, rngs, dtype, **kwargs)``, ``register_model`` and
``model_names()``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from flax import nnx

from extkd_jax.models.common import SegmentModel
from extkd_jax.models.imagenet_resnet import make_imagenet_resnet_factories
from extkd_jax.models.mlp import make_mlp_factories
from extkd_jax.models.resnet import make_resnet_factories
from extkd_jax.models.vgg import make_vgg_factories
from extkd_jax.models.wrn import make_wrn_factories

_FACTORIES: dict[str, Callable[..., SegmentModel]] = {
    **make_resnet_factories(),
    **make_imagenet_resnet_factories(),
    **make_wrn_factories(),
    **make_vgg_factories(),
    **make_mlp_factories(),
}


def register_model(name: str, factory: Callable[..., nnx.Module]) -> None:
    """Makes ``factory(num_classes, *, rngs, dtype, **kwargs)`` buildable by name (``model.name`` in a config).

    The module it returns must set ``segment_names`` and sow each segment once per call with
    ``self.sow(nnx.Intermediate, name, value)`` (public Flax API); its parameters should be float32 and
    ``dtype`` its compute dtype.
    """
    if not callable(factory):
        raise TypeError(f"register_model({name!r}): factory must be callable, got {type(factory).__name__}")
    _FACTORIES[name] = factory


def model_names() -> tuple[str, ...]:
    """The names ``create_model`` knows, registered ones included."""
    return tuple(_FACTORIES)


def create_model(
    name: str,
    num_classes: int,
    *,
    rngs: nnx.Rngs,
    dtype: Any = jnp.float32,
    **kwargs: Any,
) -> SegmentModel:
    """Build model ``name`` with float32 parameters and compute dtype ``dtype``.

    Images are NHWC (N, H, W, C); the MLP flattens its input. Extra ``kwargs`` go to the model
    (e.g. ``hidden_sizes``/``dropout``/``input_dropout``/``input_size`` for ``mlp``, ``dropout`` for WRNs,
    ``in_channels`` for the CNNs).
    """
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(_FACTORIES)}") from None
    try:
        return factory(num_classes, rngs=rngs, dtype=dtype, **kwargs)
    except TypeError as err:  # a misspelt or foreign keyword (model.kwargs / teacher.kwargs)
        if "keyword argument" not in str(err):
            raise
        raise ValueError(
            f"model {name!r} does not accept the keyword arguments {sorted(kwargs)} ({err}); "
            "check model.kwargs (or teacher.kwargs)"
        ) from None
