"""From a data config to the splits a run uses: planned from the labels, then read (all, or one process's rows).

The plan (`plan_splits`) reads labels only: the validation carve-out, the dropped classes and the optional fixed
subset are index arrays into the source's training split. `prepare_datasets` then reads the images: the
validation and test sets whole, the transfer set (the student's training set) whole or only the rows this process
places on its devices (`transfer_rows`), so a multi-host run's processes each read their own shard.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from extkd_jax.data.dataset import ArrayDataset
from extkd_jax.data.sources import Split, class_names, open_split
from extkd_jax.data.splits import drop_class_indices, validation_indices

log = logging.getLogger(__name__)

# Seeds the fixed random training subset of `data.max_train_examples` apart from the validation split's stream.
SUBSET_STREAM = 0x5B5E7


@dataclasses.dataclass(frozen=True, eq=False)
class SplitPlan:
    """Index arrays into the sources: which examples each split holds (in order)."""

    train_source: Split
    test_source: Split
    train: np.ndarray  # the training set after carving out validation (all classes: the teacher's)
    val: np.ndarray
    transfer: np.ndarray  # `train` minus the dropped classes (the student's training set)
    drop_classes: tuple[int, ...]
    num_classes: int
    class_names: list[str]


def plan_splits(data_config) -> SplitPlan:
    """The splits of `data_config` (the `data` block of configs/base.py, checked by `train.config_checks`)."""
    c = data_config
    download = bool(c.get("download", True))  # configs/base.py's data.download; older configs lack it
    train_source = open_split(c.source, c.name, "train", c.dir or None, download)
    test_source = open_split(c.source, c.name, "test", c.dir or None, download)
    if train_source.image_shape != test_source.image_shape:
        raise ValueError(
            f"{c.name!r}: train images {train_source.image_shape} but test images {test_source.image_shape}"
        )
    if train_source.num_classes != test_source.num_classes:
        raise ValueError(f"{c.name!r}: train has {train_source.num_classes} classes but test {test_source.num_classes}")
    everything = np.arange(len(train_source))
    limit = int(c.max_train_examples)
    if limit < 0:
        raise ValueError(f"data.max_train_examples={limit}: expected 0 (all) or a positive count")
    if 0 < limit < len(everything):  # a fixed random subset, for small-compute runs
        everything = np.sort(np.random.default_rng([c.seed, SUBSET_STREAM]).permutation(len(everything))[:limit])
    train_pos, val_pos = validation_indices(len(everything), c.val_size, c.seed, c.name)
    train, val = everything[train_pos], everything[val_pos]
    labels = train_source.labels
    transfer = train[
        drop_class_indices(labels[train], train_source.num_classes, tuple(c.drop_classes), c.keep_fraction, c.seed)
    ]
    dropped = tuple(int(k) for k in c.drop_classes)
    if len(transfer) == 0:
        raise ValueError(
            f"{c.name!r}: the transfer set is empty after dropping classes {dropped} from "
            f"{len(train)} training examples"
        )
    _warn_missing_classes(c.name, labels[transfer], train_source.num_classes, dropped, f"{c.source}:{c.dir}")
    return SplitPlan(
        train_source,
        test_source,
        train,
        val,
        transfer,
        dropped,
        train_source.num_classes,
        class_names(c.name, train_source.num_classes),
    )


_WARNED: set[tuple] = set()  # each (dataset, classes) warned once per process: an experiment plans many runs


def _warn_missing_classes(
    name: str, labels: np.ndarray, num_classes: int, dropped: tuple[int, ...], where: str = ""
) -> None:
    """Warns when a class that is not dropped has no training example: the model is trained as if it were dropped
    (a subset too small, a damaged file), which `data.drop_classes` would have said."""
    counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes)
    missing = tuple(int(k) for k in np.flatnonzero(counts[:num_classes] == 0) if int(k) not in dropped)
    if missing and (name, where, missing) not in _WARNED:
        _WARNED.add((name, where, missing))
        log.warning(
            "%r: class(es) %s have no training examples although they are not dropped (data.drop_classes=%s); "
            "the model never sees them in training",
            name,
            list(missing),
            list(dropped),
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Datasets:
    """The splits of one run in memory. `transfer` holds rows `transfer_rows` of the whole transfer set (all of
    them unless a multi-host run asked for its share); val and test are whole."""

    transfer: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    transfer_size: int  # of the whole transfer set
    transfer_rows: slice
    train_size: int
    drop_classes: tuple[int, ...]
    num_classes: int
    class_names: list[str]
    plan: SplitPlan


def _dataset(split: Split, indices: np.ndarray, name: str) -> ArrayDataset:
    return ArrayDataset(np.ascontiguousarray(split.read(indices)), split.labels[indices], split.num_classes, name)


def prepare_datasets(data_config, transfer_rows: slice | None = None, plan: SplitPlan | None = None) -> Datasets:
    """Reads the splits of `data_config` (or of an existing `plan`); `transfer_rows` limits the transfer set to
    those rows of it (this process's share of a sharded placement)."""
    plan = plan or plan_splits(data_config)
    rows = transfer_rows or slice(0, len(plan.transfer))
    name = data_config.name
    return Datasets(
        transfer=_dataset(plan.train_source, plan.transfer[rows], name),
        val=_dataset(plan.train_source, plan.val, name),
        test=_dataset(plan.test_source, np.arange(len(plan.test_source)), name),
        transfer_size=len(plan.transfer),
        transfer_rows=rows,
        train_size=len(plan.train),
        drop_classes=plan.drop_classes,
        num_classes=plan.num_classes,
        class_names=plan.class_names,
        plan=plan,
    )
