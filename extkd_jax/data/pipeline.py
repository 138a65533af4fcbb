"""`prepare_datasets`: from a data config to the train / val / test / transfer splits used by training."""

from __future__ import annotations

import dataclasses

import numpy as np

from extkd_jax.data.dataset import ArrayDataset
from extkd_jax.data.sources import class_names, load_split
from extkd_jax.data.splits import drop_classes, split_validation

# Seeds the fixed random training subset of `data.max_train_examples` apart from the validation split's stream.
SUBSET_STREAM = 0x5B5E7


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
    class_names: list[str]


def prepare_datasets(data_config) -> Datasets:
    """Loads and splits the data described by `data_config` (the `data` block of configs/base.py, checked by
    `train.config_checks`): source, name, dir, val_size, seed, drop_classes, keep_fraction, max_train_examples
    (0 = all; else a fixed random subset of the training split, taken before val)."""
    c = data_config
    full_train = load_split(c.source, c.name, "train", c.dir or None)
    test = load_split(c.source, c.name, "test", c.dir or None)
    if full_train.image_shape != test.image_shape:
        raise ValueError(f"{c.name!r}: train images {full_train.image_shape} but test images {test.image_shape}")
    if full_train.num_classes != test.num_classes:
        raise ValueError(f"{c.name!r}: train has {full_train.num_classes} classes but test {test.num_classes}")
    limit = int(c.max_train_examples)
    if limit < 0:
        raise ValueError(f"data.max_train_examples={limit}: expected 0 (all) or a positive count")
    if 0 < limit < len(full_train):  # a fixed random subset, for small-compute runs
        subset = np.sort(np.random.default_rng([c.seed, SUBSET_STREAM]).permutation(len(full_train))[:limit])
        full_train = full_train.select(subset)
    train, val = split_validation(full_train, c.val_size, c.seed)
    transfer = drop_classes(train, tuple(c.drop_classes), c.keep_fraction, c.seed)
    dropped = tuple(int(k) for k in c.drop_classes)  # validated as ints by drop_classes
    if len(transfer) == 0:
        raise ValueError(
            f"{c.name!r}: the transfer set is empty after dropping classes {dropped} from "
            f"{len(train)} training examples"
        )
    return Datasets(
        train=train,
        val=val,
        test=test,
        transfer=transfer,
        drop_classes=dropped,
        num_classes=full_train.num_classes,
        class_names=class_names(c.name, full_train.num_classes),
    )
