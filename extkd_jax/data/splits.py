"""Deterministic validation splits and class dropping (all numpy, seeded)."""

from __future__ import annotations

import numpy as np

from extkd_jax.data.dataset import ArrayDataset


def _check_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{what} must be an int, got {type(value).__name__}: {value!r}")
    return int(value)


def split_validation(ds: ArrayDataset, val_size: int, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """Splits `ds` into (train, val) with `val_size` examples in val, chosen uniformly at random by `seed`.

    Both parts keep the original order of `ds`. `val_size=0` gives an empty val (0 examples, same H, W, C).
    """
    val_size = _check_int(val_size, "val_size")
    seed = _check_int(seed, "seed")
    if val_size < 0:
        raise ValueError(f"val_size must be >= 0, got {val_size}")
    if val_size >= len(ds):
        raise ValueError(
            f"val_size {val_size} must be smaller than the dataset {ds.name!r} ({len(ds)} examples), "
            f"so that some training examples remain"
        )
    perm = np.random.default_rng(seed).permutation(len(ds))
    val_idx = np.sort(perm[:val_size])
    train_idx = np.sort(perm[val_size:])
    return ds.select(train_idx), ds.select(val_idx)


def drop_classes(ds: ArrayDataset, classes, keep_fraction: float = 0.0, seed: int = 0) -> ArrayDataset:
    """Removes the examples whose label is in `classes`, keeping order.

    With `keep_fraction > 0`, ``round(keep_fraction * count)`` examples of each dropped class stay (chosen at random
    with a generator seeded by ``(seed, class)``, so one class's choice does not depend on the other classes).
    Errors (ValueError): a class out of [0, num_classes), duplicate classes, keep_fraction outside [0, 1), or
    dropping every class.
    """
    classes = tuple(_check_int(c, "each class to drop") for c in classes)
    seed = _check_int(seed, "seed")
    for c in classes:
        if not 0 <= c < ds.num_classes:
            raise ValueError(f"class {c} to drop is out of range [0, num_classes={ds.num_classes})")
    duplicates = sorted({c for c in classes if classes.count(c) > 1})
    if duplicates:
        raise ValueError(f"classes to drop {classes} contain duplicates: {duplicates}")
    try:
        keep_fraction = float(keep_fraction)
    except (TypeError, ValueError):
        raise ValueError(f"keep_fraction must be a number in [0, 1), got {keep_fraction!r}") from None
    if not 0.0 <= keep_fraction < 1.0:
        raise ValueError(f"keep_fraction {keep_fraction} is outside [0, 1)")
    if len(classes) >= ds.num_classes:
        raise ValueError(
            f"dropping classes {classes} would drop every one of the {ds.num_classes} classes of {ds.name!r}"
        )
    if not classes:
        return ds
    keep = ~np.isin(ds.labels, np.asarray(classes, dtype=np.int32))
    if keep_fraction > 0.0:
        for c in classes:
            idx = np.flatnonzero(ds.labels == c)
            k = int(round(keep_fraction * idx.size))
            if k:
                rng = np.random.default_rng([seed, c])
                keep[rng.choice(idx, size=k, replace=False)] = True
    return ds.select(np.flatnonzero(keep))
