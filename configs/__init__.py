"""The presets (`extkd_jax.configs.<name>`), and `get`: a preset's ConfigDict by name, with overrides.

    from extkd_jax import configs
    config = configs.get("digits_omit3", "teacher", **{"optim.learning_rate": 0.01})

`configs.base` holds every key with its default; each preset changes what differs. Importing this package imports
nothing (ml_collections is imported by `get`).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.resources
import importlib.util
import pathlib
from typing import Any

__all__ = ["get", "names", "flat_keys", "override", "did_you_mean"]


def names() -> list[str]:
    """The presets shipped in the package, by name (what `get` and `extkd --config=NAME` take)."""
    files = importlib.resources.files(__name__).iterdir()
    return sorted(f.name[:-3] for f in files if f.name.endswith(".py") and f.name not in ("__init__.py", "base.py"))


def did_you_mean(word: str, choices) -> str:
    """' Did you mean "X"?' for the closest of `choices` to `word` (difflib), or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f' Did you mean "{close[0]}"?' if close else ""


def get(name: str, variant: str | None = None, **overrides: Any):
    """The ConfigDict of preset `name` (or of a config file's path), every key of `configs.base` included.

    `variant` is the preset's `:variant` (a size such as "cpu", a role such as "teacher"); `name` may also carry
    it ("digits_omit3:teacher"). `overrides` are dotted keys, `**{"optim.learning_rate": 0.01}`; an unknown name
    or key raises ValueError naming it, with the closest known one.
    """
    name, sep, suffix = str(name).partition(":")
    if sep and variant is not None:
        raise ValueError(f"variant given twice: {name}:{suffix} and variant={variant!r}")
    variant = suffix if sep else variant
    module = _module_of(name)
    config = module.get_config(variant) if variant is not None else module.get_config()
    for key, value in overrides.items():
        override(config, key, value)
    return config


def _module_of(name: str):
    if name.endswith(".py") or "/" in name:
        path = pathlib.Path(name)
        if not path.is_file():
            raise ValueError(f"config file {name}: no such file")
        spec = importlib.util.spec_from_file_location(f"_extkd_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    elif name in names():
        module = importlib.import_module(f"{__name__}.{name}")
    else:
        raise ValueError(
            f"unknown config preset {name!r}; expected one of {', '.join(names())} or a config file's path."
            + did_you_mean(name, names())
        )
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"config {name!r} defines no get_config() function")
    return module


def flat_keys(config) -> list[str]:
    """Every leaf key of a ConfigDict, dotted ("optim.learning_rate"), in the config's order."""
    out = []
    for key, value in config.items():
        if hasattr(value, "items") and not isinstance(value, str):
            out += [f"{key}.{sub}" for sub in flat_keys(value)]
        else:
            out.append(key)
    return out


def override(config, key: str, value: Any) -> None:
    """Sets dotted `key` of `config` to `value` in place; an unknown key raises ValueError naming it and the
    closest known key (over every dotted key of the config)."""
    *parents, last = key.split(".")
    target = config
    for i, part in enumerate(parents + [last]):
        is_leaf = i == len(parents)
        if not hasattr(target, "items") or part not in target:
            raise ValueError(f"unknown config key {key!r}." + did_you_mean(key, flat_keys(config)))
        if is_leaf:
            break
        target = target[part]
    try:
        target[last] = value
    except (TypeError, ValueError) as err:
        raise ValueError(f"config key {key!r}={value!r}: {err}") from None
