"""The method registry: `register_method`, `get_method`, `method_names`. The built-in methods register on first
use (their modules import JAX and Flax; the registry itself imports nothing heavy), a plug-in's when its module is
imported (`config.imports`)."""

from __future__ import annotations

import difflib
import importlib

from extkd_jax.methods.base import Method

_METHODS: dict[str, Method] = {}
_LOADED: list[bool] = []
_BUILTIN: set[str] = set()


def _load_builtins() -> None:
    """Registers the package's methods (methods/builtin.py) on first use: before any plug-in's, since
    `register_method` calls this first."""
    if not _LOADED:
        _LOADED.append(True)
        for method in importlib.import_module("extkd_jax.methods.builtin").BUILTIN:
            _METHODS[method.name] = method
        _BUILTIN.update(_METHODS)


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Adds `method` under `method.name` (a built-in or an earlier one of that name only with replace=True)."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method expects an extkd_jax.methods.Method, got {type(method).__name__}")
    _load_builtins()
    if method.name in _METHODS and not replace:
        raise ValueError(f"method {method.name!r} is already registered; pass replace=True to replace it")
    if method.loss and method.loss != method.name and method.loss not in _METHODS:
        raise ValueError(f"method {method.name!r} trains with loss {method.loss!r}, which no method registers")
    _METHODS[method.name] = method
    return method


def did_you_mean(name: str, names) -> str:
    close = difflib.get_close_matches(name, list(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def get_method(name: str) -> Method:
    """The method registered as `name`; an unknown name raises ValueError naming the close ones."""
    _load_builtins()
    if name not in _METHODS:
        raise ValueError(
            f"unknown method {name!r}{did_you_mean(name, _METHODS)}; expected one of {tuple(_METHODS)} "
            "(a plug-in's module registers it: config.imports)"
        )
    return _METHODS[name]


def method_names() -> tuple[str, ...]:
    """Every registered method, built-in ones first."""
    _load_builtins()
    return tuple(_METHODS)


def loss_names() -> tuple[str, ...]:
    """The values `loss.name` accepts: the methods with an objective of their own."""
    return tuple(n for n in method_names() if _METHODS[n].objective is not None)


def role_names() -> tuple[str, ...]:
    """The methods `extkd reproduce` compares (`reproduce.methods`)."""
    return tuple(n for n in method_names() if _METHODS[n].role)


def builtin_names() -> tuple[str, ...]:
    """The methods of the package itself (not plug-ins)."""
    _load_builtins()
    return tuple(n for n in _METHODS if n in _BUILTIN)


def with_method_knobs(loss_config) -> None:
    """Adds to a `loss` config block the namespace `loss.<name>` of every registered method that has knobs and
    lacks it (a plug-in's, registered after the config was made), at the method's defaults."""
    for name in method_names():
        method = _METHODS[name]
        if method.knobs and name not in loss_config:
            with loss_config.unlocked():
                loss_config[name] = {**method.knobs}
