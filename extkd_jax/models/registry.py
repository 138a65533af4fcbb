"""Model registry: ``create_model(name, num_classes, *, rngs, dtype, **kwargs)``, ``register_model`` and
``model_names()``.

A model registered from a module of one's own is known in the process that imported that module. So that a new
process (``extkd evaluate``, ``extkd_jax.load``, a rerun) finds it, the registry remembers which module registered it
(``model_imports``): the checkpoint's card records it, with the config's ``imports``, and ``ensure_model`` imports
them when the name is not known yet.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable
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
_BUILT_IN = frozenset(_FACTORIES)
_ORIGINS: dict[str, str] = {}  # name -> the module whose code registered it (its import registers it again)


def register_model(name: str, factory: Callable[..., nnx.Module]) -> None:
    """Makes ``factory(num_classes, *, rngs, dtype, **kwargs)`` buildable by name (``model.name`` in a config).

    The module it returns must set ``segment_names`` and sow each segment once per call with
    ``self.sow(nnx.Intermediate, name, value)`` (public Flax API); its parameters should be float32 and
    ``dtype`` its compute dtype. Call it when the module is imported (at its top level): the module's import path
    is recorded with the runs that use the model, and imported again to rebuild it (``model_imports``).
    """
    if not callable(factory):
        raise TypeError(f"register_model({name!r}): factory must be callable, got {type(factory).__name__}")
    _FACTORIES[name] = factory
    _ORIGINS[name] = sys._getframe(1).f_globals.get("__name__", "")  # the caller's module


def model_imports(name: str, imports: Iterable[str] = ()) -> tuple[str, ...]:
    """The modules a new process imports before it builds model `name`: `imports` (a config's), then the module
    that registered `name` when it is not built in (none for a script run as ``__main__``, which cannot be
    imported again)."""
    origin = _ORIGINS.get(name, "") if name not in _BUILT_IN else ""
    return tuple(dict.fromkeys([*imports, *([origin] if origin and origin != "__main__" else [])]))


def import_modules(modules: Iterable[str], why: str) -> None:
    """Imports each module (dotted path); a ValueError naming the module and `why` it was needed when one fails."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(
                f"{why}: cannot import the module {module!r} ({err}); install it or put its folder on PYTHONPATH"
            ) from err


def ensure_model(name: str, imports: Iterable[str] = ()) -> None:
    """Makes model `name` buildable: imports `imports` (a card's or a config's) when the name is not known yet."""
    if name not in _FACTORIES:
        import_modules(imports, f"model {name!r} is not built in; it is registered by the modules {tuple(imports)}")


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
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(_FACTORIES)}. A model of one's own: register it "
            "with register_model in a module named in the config's `imports`"
        ) from None
    try:
        return factory(num_classes, rngs=rngs, dtype=dtype, **kwargs)
    except TypeError as err:  # a misspelt or foreign keyword (model.kwargs / teacher.kwargs)
        if "keyword argument" not in str(err):
            raise
        raise ValueError(
            f"model {name!r} does not accept the keyword arguments {sorted(kwargs)} ({err}); "
            "check model.kwargs (or teacher.kwargs)"
        ) from None
