"""`ArrayDataset`: a whole split held in memory as uint8 images and int32 labels."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
    """One split of an image classification dataset.

    Attributes:
      images: uint8 array (N, H, W, C), pixel values 0..255, not normalised (grayscale has C=1).
      labels: int32 array (N,), every value in [0, num_classes).
      num_classes: number of classes of the full dataset (not only those present in this split).
      name: dataset name, e.g. "mnist" or "cifar10".
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self):
        images, labels = self.images, self.labels
        if not isinstance(self.name, str):
            raise TypeError(f"ArrayDataset name must be a str, got {type(self.name).__name__}: {self.name!r}")
        where = f"ArrayDataset {self.name!r}"
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, (int, np.integer)):
            raise TypeError(
                f"{where}: num_classes must be an int, got {type(self.num_classes).__name__}: {self.num_classes!r}"
            )
        if self.num_classes < 1:
            raise ValueError(f"{where}: num_classes must be >= 1, got {self.num_classes}")
        object.__setattr__(self, "num_classes", int(self.num_classes))
        if not isinstance(images, np.ndarray):
            raise TypeError(f"{where}: images must be a numpy array, got {type(images).__name__}")
        if not isinstance(labels, np.ndarray):
            raise TypeError(f"{where}: labels must be a numpy array, got {type(labels).__name__}")
        if images.dtype != np.uint8:
            raise ValueError(f"{where}: images dtype {images.dtype}, expected uint8")
        if images.ndim != 4:
            raise ValueError(
                f"{where}: images shape {images.shape}, expected 4 axes (N, H, W, C) (grayscale needs C=1)"
            )
        if labels.dtype != np.int32:
            raise ValueError(f"{where}: labels dtype {labels.dtype}, expected int32")
        if labels.ndim != 1:
            raise ValueError(f"{where}: labels shape {labels.shape}, expected (N,)")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"{where}: {images.shape[0]} images but {labels.shape[0]} labels, expected the same number"
            )
        if labels.size:
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= self.num_classes:
                bad = lo if lo < 0 else hi
                raise ValueError(f"{where}: label {bad} out of range [0, num_classes={self.num_classes})")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return tuple(int(d) for d in self.images.shape[1:])

    def select(self, indices) -> ArrayDataset:
        """A new dataset with the examples at `indices` (in that order)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        return ArrayDataset(self.images[indices], self.labels[indices], self.num_classes, self.name)
