"""Data: sources (npz, tfds, sklearn digits), validation split and class dropping, jitted augmentation."""

from extkd_jax.data.augment import (
    AUGMENTATIONS,
    augment_batch,
    channel_stats,
    channel_sums,
    default_augmentation,
    stats_from_sums,
)
from extkd_jax.data.dataset import ArrayDataset
from extkd_jax.data.pipeline import Datasets, SplitPlan, plan_splits, prepare_datasets
from extkd_jax.data.sources import (
    KNOWN_NUM_CLASSES,
    SKLEARN_NAMES,
    SOURCES,
    TFDS_NAMES,
    Split,
    class_names,
    load_split,
    open_split,
)
from extkd_jax.data.splits import drop_classes, split_validation

__all__ = [
    "AUGMENTATIONS",
    "KNOWN_NUM_CLASSES",
    "SKLEARN_NAMES",
    "SOURCES",
    "TFDS_NAMES",
    "ArrayDataset",
    "Datasets",
    "Split",
    "SplitPlan",
    "augment_batch",
    "channel_stats",
    "channel_sums",
    "class_names",
    "default_augmentation",
    "drop_classes",
    "load_split",
    "open_split",
    "plan_splits",
    "prepare_datasets",
    "split_validation",
    "stats_from_sums",
]
