"""`prepare_datasets`: from a data config to the train / val / test / transfer splits used by training."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from extkd_jax.data.dataset import ArrayDataset
from extkd_jax.data.sources import load_split
from extkd_jax.data.splits import drop_classes, split_validation

_DEFAULTS = {"dir": None, "val_size": 0, "drop_classes": (), "keep_fraction": 0.0, "seed": 0,
             "max_train_examples": 0}


@dataclasses.dataclass(frozen=True, eq=False)
class Datasets:
    """The splits of one experiment.

    train: the full training set after carving out val (all classes; the teacher's training set).
    val: held out from the training set (all classes). test: the test split (all classes).
    transfer: `train` minus the dropped classes (the student's training set).
    """

    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    transfer: ArrayDataset
    drop_classes: tuple[int, ...]
    num_classes: int


def _get(config, key: str, required: bool = False):
    if isinstance(config, Mapping):
        if key in config:
            return config[key]
    else:
        try:
            return getattr(config, key)
        except (AttributeError, KeyError):
            pass
    if required:
        raise ValueError(f"data config has no {key!r}; it needs source, name (and optionally {sorted(_DEFAULTS)})")
    return _DEFAULTS[key]


def prepare_datasets(data_config) -> Datasets:
    """Loads and splits the data described by `data_config` (a ConfigDict, a mapping or any attribute object).

    Keys: source, name, dir, val_size, drop_classes (tuple of labels), keep_fraction, seed, and
    max_train_examples (0 = all; else a fixed random subset of the training split, taken before val).
    """
    source = _get(data_config, "source", required=True)
    name = _get(data_config, "name", required=True)
    data_dir = _get(data_config, "dir") or None
    seed = _get(data_config, "seed")
    dropped = tuple(_get(data_config, "drop_classes") or ())

    full_train = load_split(source, name, "train", data_dir)
    test = load_split(source, name, "test", data_dir)
    if full_train.image_shape != test.image_shape:
        raise ValueError(f"{name!r}: train images {full_train.image_shape} but test images {test.image_shape}")
    if full_train.num_classes != test.num_classes:
        raise ValueError(f"{name!r}: train has {full_train.num_classes} classes but test {test.num_classes}")
    limit = int(_get(data_config, "max_train_examples") or 0)
    if limit < 0:
        raise ValueError(f"data.max_train_examples={limit}: expected 0 (all) or a positive count")
    if 0 < limit < len(full_train):  # a fixed random subset, for small-compute runs
        subset = np.sort(np.random.default_rng([seed, 0x5B5E7]).permutation(len(full_train))[:limit])
        full_train = full_train.select(subset)
    train, val = split_validation(full_train, _get(data_config, "val_size"), seed)
    transfer = drop_classes(train, dropped, _get(data_config, "keep_fraction"), seed)
    dropped = tuple(int(c) for c in dropped)  # validated as ints by drop_classes
    if len(transfer) == 0:
        raise ValueError(
            f"{name!r}: the transfer set is empty after dropping classes {dropped} from {len(train)} training examples"
        )
    return Datasets(train=train, val=val, test=test, transfer=transfer, drop_classes=dropped,
                    num_classes=full_train.num_classes)
