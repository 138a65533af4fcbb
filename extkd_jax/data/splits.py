"""Deterministic validation splits and class dropping, as index arrays (numpy, seeded) and on datasets."""

from __future__ import annotations

import numpy as np

from extkd_jax.data.dataset import ArrayDataset


def _check_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{what} must be an int, got {type(value).__name__}: {value!r}")
    return int(value)


def validation_indices(n: int, val_size: int, seed: int, name: str = "dataset") -> tuple[np.ndarray, np.ndarray]:
    """(train positions, val positions) of `n` examples: `val_size` chosen uniformly at random by `seed`, both
    in their original order."""
    val_size, seed = _check_int(val_size, "val_size"), _check_int(seed, "seed")
    if val_size < 0:
        raise ValueError(f"val_size must be >= 0, got {val_size}")
    if val_size >= n:
        raise ValueError(
            f"val_size {val_size} must be smaller than the dataset {name!r} ({n} examples), so that "
            "some training examples remain"
        )
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def drop_class_indices(
    labels: np.ndarray, num_classes: int, classes, keep_fraction: float = 0.0, seed: int = 0
) -> np.ndarray:
    """Positions of `labels` kept when `classes` are dropped, in order.

    With `keep_fraction > 0`, ``round(keep_fraction * count)`` examples of each dropped class stay (chosen at random
    with a generator seeded by ``(seed, class)``, so one class's choice does not depend on the other classes).
    Errors (ValueError): a class out of [0, num_classes), duplicates, keep_fraction outside [0, 1), every class.
    """
    classes = tuple(_check_int(c, "each class to drop") for c in classes)
    seed = _check_int(seed, "seed")
    for c in classes:
        if not 0 <= c < num_classes:
            raise ValueError(f"class {c} to drop is out of range [0, num_classes={num_classes})")
    duplicates = sorted({c for c in classes if classes.count(c) > 1})
    if duplicates:
        raise ValueError(f"classes to drop {classes} contain duplicates: {duplicates}")
    try:
        keep_fraction = float(keep_fraction)
    except (TypeError, ValueError):
        raise ValueError(f"keep_fraction must be a number in [0, 1), got {keep_fraction!r}") from None
    if not 0.0 <= keep_fraction < 1.0:
        raise ValueError(f"keep_fraction {keep_fraction} is outside [0, 1)")
    if len(classes) >= num_classes:
        raise ValueError(f"dropping classes {classes} would drop every one of the {num_classes} classes")
    labels = np.asarray(labels)
    keep = ~np.isin(labels, np.asarray(classes, dtype=labels.dtype))
    for c in classes if keep_fraction > 0.0 else ():
        idx = np.flatnonzero(labels == c)
        k = int(round(keep_fraction * idx.size))
        if k:
            keep[np.random.default_rng([seed, c]).choice(idx, size=k, replace=False)] = True
    return np.flatnonzero(keep)


def split_validation(ds: ArrayDataset, val_size: int, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """`ds` split into (train, val) as `validation_indices` chooses."""
    train, val = validation_indices(len(ds), val_size, seed, ds.name)
    return ds.select(train), ds.select(val)


def drop_classes(ds: ArrayDataset, classes, keep_fraction: float = 0.0, seed: int = 0) -> ArrayDataset:
    """`ds` without the examples of `classes` (see `drop_class_indices`); `ds` itself when there are none."""
    if not tuple(classes):
        return ds
    try:
        return ds.select(drop_class_indices(ds.labels, ds.num_classes, classes, keep_fraction, seed))
    except ValueError as err:
        if "would drop every one" in str(err):
            raise ValueError(f"{err} of {ds.name!r}") from None
        raise


SELECTION_STREAM = 0x5E1EC7  # seeds the selection's labelled / pool halves apart from the validation split's stream


def selection_indices(
    labels: np.ndarray, num_classes: int, classes, labelled_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(labelled positions, pool positions) of a validation carve-out whose `labels` are given, for choosing knobs
    blind to the dropped `classes`.

    The positions are halved at random by `seed` alone (no label read): ``round(labelled_fraction * n)`` of them
    are the labelled candidates, the rest the pool. The labelled set is the candidates with the dropped classes
    removed, as the transfer set is built (`drop_class_indices`): a held-out part of the transfer set. The pool keeps
    every class; its labels are never read, here or by the criterion. The two sets are disjoint by construction.
    """
    seed = _check_int(seed, "seed")
    try:
        fraction = float(labelled_fraction)
    except (TypeError, ValueError):
        raise ValueError(f"labelled_fraction must be a number in (0, 1), got {labelled_fraction!r}") from None
    if not 0.0 < fraction < 1.0:
        raise ValueError(
            f"labelled_fraction {labelled_fraction} is outside (0, 1): the pool and the labelled set each need images"
        )
    n = len(labels)
    perm = np.random.default_rng([seed, SELECTION_STREAM]).permutation(n)
    cut = int(round(fraction * n))
    candidates, pool = np.sort(perm[:cut]), np.sort(perm[cut:])
    if not len(candidates) or not tuple(classes):
        return candidates, pool
    kept = drop_class_indices(np.asarray(labels)[candidates], num_classes, classes)
    return candidates[kept], pool
