"""Which pip extra brings a missing module, and the one-line hint that says so.

`pip install extkd_jax` installs the losses only (jax, chex, numpy); `extkd`, `extkd_jax.load` and the engine need
extras. An entry point wraps its imports in `needs_extras("extkd reproduce")`, so that a missing extra ends in
`extkd reproduce needs the training extras: pip install "extkd_jax[train]"` rather than a bare
`ModuleNotFoundError: No module named 'etils'`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

# extra of setup.cfg -> (what it is, in the hint; the top-level modules it brings that extkd_jax imports)
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "train": (
        "the training extras",
        ("flax", "optax", "orbax", "tensorstore", "etils", "ml_collections", "absl", "tqdm", "tensorboard", "fsspec"),
    ),
    "plots": ("matplotlib and Pillow", ("matplotlib", "PIL")),
    "digits": ("scikit-learn", ("sklearn",)),
    "tfds": ("tensorflow-datasets", ("tensorflow_datasets",)),
    "stream": ("grain", ("grain",)),
    "gcs": ("gcsfs for gs:// paths", ("gcsfs",)),
    "torch": ("torch", ("torch",)),
}


class MissingExtraError(ModuleNotFoundError):
    """A module of a pip extra is not installed; the message is the one-line hint naming the extra."""


def extra_of(module: str | None) -> str | None:
    """The extra that installs `module` (a dotted name: its top-level package decides), or None if none does."""
    top = (module or "").partition(".")[0]
    return next((extra for extra, (_, modules) in EXTRAS.items() if top in modules), None)


def install_hint(what: str, extra: str) -> str:
    """`<what> needs <the extra's contents>: pip install "extkd_jax[<extra>]"`."""
    if extra not in EXTRAS:
        raise ValueError(f"no extra {extra!r}; expected one of {', '.join(EXTRAS)}")
    return f'{what} needs {EXTRAS[extra][0]}: pip install "extkd_jax[{extra}]"'


def hint_for(err: ImportError, what: str) -> str | None:
    """The hint for an ImportError caused by a missing extra, or None when no extra would fix it.

    Recognises a missing module of an extra (`err.name`), fsspec's "Please install gcsfs" (a gs:// path without
    gcsfs) and the ImportErrors of extkd_jax's optional paths, which already name their extra.
    """
    message = str(err)
    if "extkd_jax[" in message:  # e.g. "data.source='sklearn' needs scikit-learn: pip install 'extkd_jax[digits]'"
        return f"{what}: {message}"
    if "gcsfs" in message:
        return install_hint(what, "gcs")
    extra = extra_of(err.name) if isinstance(err, ModuleNotFoundError) else None
    return install_hint(what, extra) if extra else None


@contextlib.contextmanager
def needs_extras(what: str) -> Iterator[None]:
    """Turns an ImportError of a missing extra inside the block into a MissingExtraError carrying the hint."""
    try:
        yield
    except MissingExtraError:
        raise
    except ImportError as err:
        hint = hint_for(err, what)
        if hint is None:
            raise
        raise MissingExtraError(hint, name=err.name) from err
