"""Where images come from: one `Split` per (source, dataset, split), read by index.

- ``"npz"``: a folder of `.npz` files (see `extkd_jax.data.npz`), images memory-mapped when stored uncompressed.
  Where (`open_split`): `data_dir` (`--config.data.dir`, local or gs://) when given, else `$EXTKD_DATA_DIR/<name>`,
  else tensorflow-datasets (below, `data_dir` left to tfds: `$TFDS_DATA_DIR` or ~/tensorflow_datasets); when none
  has it, one `DataNotFoundError` names the three ways and `extkd data prepare` (extkd_jax/data/prepare.py);
- ``"tfds"``: ``tfds.data_source(name, split=..., data_dir=..., download=...)`` (ArrayRecord files, no TensorFlow
  needed to read them), prepared beforehand or downloaded and prepared when `download` (`data.download`); any tfds
  dataset with an ``image`` and a ``label`` feature; records are decoded one at a time (variable-size images
  allowed);
- ``"sklearn"``: ``name="digits"``, scikit-learn's bundled 8x8 digits (1797 images, values 0..16), scaled to
  uint8 as ``x * 255 // 16`` with shape (N, 8, 8, 1); the first 1200 images are train, the last 597 test.

A `Split` has `labels` (read whole: the experiment plans its splits from them), `read(indices)` (images, uint8
NHWC) and `bytes_read`: the image bytes this process has loaded from storage (rows of a memory map, whole members
read at once, decoded records), for checking that each process reads only its share.
"""

from __future__ import annotations

import logging

import numpy as np

from extkd_jax.data import npz
from extkd_jax.data.dataset import ArrayDataset

log = logging.getLogger(__name__)

SOURCES = ("npz", "tfds", "sklearn")
SPLITS = ("train", "test")
# The tfds datasets the presets and tests use; any other tfds name with `image` and `label` features works too.
TFDS_NAMES = ("cifar10", "cifar100", "mnist", "fashion_mnist", "imagenet2012", "imagenette")
SKLEARN_NAMES = ("digits",)
# Number of classes of the datasets we know; other npz datasets use max label + 1 over all their files.
KNOWN_NUM_CLASSES = {
    "mnist": 10,
    "fashion_mnist": 10,
    "cifar10": 10,
    "cifar100": 100,
    "digits": 10,
    "imagenet2012": 1000,
    "imagenette": 10,
}
TFDS_SPLITS = {"imagenet2012": {"test": "validation"}, "imagenette": {"test": "validation"}}
CLASS_NAMES = {
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "fashion_mnist": (
        "t-shirt",
        "trouser",
        "pullover",
        "dress",
        "coat",
        "sandal",
        "shirt",
        "sneaker",
        "bag",
        "ankle boot",
    ),
}
DIGITS_NUM_TRAIN = 1200  # sklearn digits: images [0, 1200) are train, [1200, 1797) are test.


class DataNotFoundError(FileNotFoundError):
    """No way of finding a dataset had it; the message names each way, why it failed, and the prepare command."""


def missing_data_message(name: str, dir_why: str, env_why: str, tfds_why: str) -> str:
    """The one message for a dataset found nowhere: the three ways, in the order they are tried, and the fix."""
    return (
        f"dataset {name!r} not found. A run takes it from the first of:\n"
        f"  1. --config.data.dir=DIR, an npz folder DIR/{name}/ (or DIR itself), local or gs://: {dir_why}\n"
        f"  2. $EXTKD_DATA_DIR/{name}, an npz folder: {env_why}\n"
        f"  3. tensorflow-datasets {name!r} under $TFDS_DATA_DIR (default ~/tensorflow_datasets), downloaded there "
        f"when --config.data.download=True (the default): {tfds_why}\n"
        f"Make an npz folder from the files you have (CIFAR python tarballs, MNIST idx files) or from tfds:\n"
        f"  extkd data prepare {name} --out=DIR [--from=PATH]\n"
        f"then run with EXTKD_DATA_DIR=DIR or --config.data.dir=DIR (npz folders: {npz.LAYOUT})."
    )


def _short(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text if len(text) <= limit else text[:limit] + " ..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def class_names(name: str, num_classes: int) -> list[str]:
    """Readable class names of a dataset ("cat", ...), else the class indices as strings."""
    names = CLASS_NAMES.get(name)
    return list(names) if names and len(names) == num_classes else [str(i) for i in range(num_classes)]


def _as_nhwc_uint8(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype != np.uint8:
        raise ValueError(f"{where}: images dtype {x.dtype}, expected uint8")
    if x.ndim == 3:  # grayscale (N, H, W)
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"{where}: images shape {x.shape}, expected (N, H, W) or (N, H, W, C)")
    return x


def _as_int32_labels(y: np.ndarray, where: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:  # keras-style (N, 1)
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{where}: labels shape {y.shape}, expected (N,)")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: labels dtype {y.dtype}, expected an integer dtype")
    if y.size and (int(y.min()) < 0 or int(y.max()) > np.iinfo(np.int32).max):
        raise ValueError(f"{where}: labels range [{int(y.min())}, {int(y.max())}], expected class ids in [0, 2**31)")
    return np.asarray(y).astype(np.int32)


class Split:
    """One split of a dataset, read by index. Subclasses set `name`, `num_classes`, `image_shape` (None when
    images differ in size) and implement `labels` and `_read`."""

    name: str
    num_classes: int
    image_shape: tuple[int, ...] | None
    origin = "in memory"  # where the images come from, for the log (an npz folder, a tfds directory)

    def __init__(self):
        self.bytes_read = 0

    @property
    def labels(self) -> np.ndarray:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices) -> np.ndarray:
        """Images at `indices` (in that order), uint8 (len, H, W, C); needs a fixed image shape."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        if self.image_shape is None:
            raise ValueError(
                f"{self.name!r}: images of different sizes cannot be stacked; read them one by one "
                "(the stream pipeline does: data.pipeline='stream')"
            )
        return self._read(indices)

    def read_one(self, index: int) -> np.ndarray:
        return self._read(np.asarray([index]))[0]

    def _read(self, indices: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def dataset(self) -> ArrayDataset:
        """The whole split in memory."""
        return ArrayDataset(
            np.ascontiguousarray(self.read(np.arange(len(self)))), self.labels, self.num_classes, self.name
        )


class ArraySplit(Split):
    """A split already in memory (sklearn digits, tests)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int, name: str):
        super().__init__()
        self.images, self._labels = images, labels
        self.num_classes, self.name, self.image_shape = num_classes, name, tuple(images.shape[1:])

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def _read(self, indices: np.ndarray) -> np.ndarray:
        out = self.images[indices]
        self.bytes_read += out.nbytes
        return out


class NpzSplit(Split):
    """The parts of an npz split, concatenated in numeric order; images memory-mapped where possible."""

    def __init__(self, name: str, split: str, data_dir):
        super().__init__()
        self.name, folder = name, npz.npz_folder(name, data_dir)
        self.origin = f"npz folder {folder}"
        self.files = npz.split_files(folder, split)
        self.parts, labels = [], []
        for path in self.files:
            x = _as_nhwc_uint8(npz.read_member(path, f"x_{split}"), str(path))
            y = _as_int32_labels(npz.read_member(path, f"y_{split}", mmap=False), str(path))
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"{path}: {x.shape[0]} images but {y.shape[0]} labels, expected the same number")
            limit = KNOWN_NUM_CLASSES.get(name)
            if limit and y.size and int(y.max()) >= limit:
                raise ValueError(
                    f"{path}: label {int(y.max())} out of range [0, {limit}) for dataset {name!r} ({limit} classes)"
                )
            if not isinstance(x, np.memmap):
                self.bytes_read += x.nbytes  # a compressed or remote member is read whole
            self.parts.append(x)
            labels.append(y)
        shapes = {p.shape[1:] for p in self.parts}
        if len(shapes) > 1:
            raise ValueError(f"npz dataset {name!r} {split}: parts have different image shapes {sorted(shapes)}")
        self._labels = np.concatenate(labels) if len(labels) > 1 else labels[0]
        self.image_shape = tuple(self.parts[0].shape[1:])
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.num_classes = KNOWN_NUM_CLASSES.get(name) or _npz_num_classes(folder)
        if self._labels.size and int(self._labels.max()) >= self.num_classes:
            raise ValueError(
                f"{self.files[0].parent}: label {int(self._labels.max())} out of range "
                f"[0, {self.num_classes}) for dataset {name!r} ({self.num_classes} classes)"
            )

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def _read(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices), *self.image_shape), np.uint8)
        part = np.searchsorted(self.starts, indices, side="right") - 1
        for k in np.unique(part):
            chosen = part == k
            local = indices[chosen] - self.starts[k]
            order = np.argsort(local)  # sorted reads of a memory map touch each page once
            rows = np.empty_like(order)
            rows[order] = np.arange(len(order))
            out[np.flatnonzero(chosen)] = np.asarray(self.parts[k][local[order]])[rows]
            if isinstance(self.parts[k], np.memmap):
                self.bytes_read += int(chosen.sum()) * out[0].nbytes
        return out


def _npz_num_classes(folder) -> int:
    top = -1
    for split in SPLITS:
        try:
            files = npz.split_files(folder, split)
        except FileNotFoundError:
            continue
        for path in files:
            y = npz.read_member(path, f"y_{split}", mmap=False)
            if y.size:
                top = max(top, int(np.max(y)))
    return max(top + 1, 1)


def _sklearn_split(name: str, split: str) -> ArraySplit:
    if name not in SKLEARN_NAMES:
        raise ValueError(f"unknown sklearn dataset {name!r}; known sklearn names: {SKLEARN_NAMES}")
    try:
        from sklearn.datasets import load_digits  # lazy: the [digits] extra
    except ImportError as err:
        raise ImportError("data.source='sklearn' needs scikit-learn: pip install 'extkd_jax[digits]'") from err
    digits = load_digits()
    x = (digits.images.astype(np.int64) * 255 // 16).astype(np.uint8)[..., None]  # (1797, 8, 8, 1)
    y = digits.target.astype(np.int32)
    rows = slice(0, DIGITS_NUM_TRAIN) if split == "train" else slice(DIGITS_NUM_TRAIN, None)
    return ArraySplit(np.ascontiguousarray(x[rows]), np.ascontiguousarray(y[rows]), KNOWN_NUM_CLASSES[name], name)


def open_split(source: str, name: str, split: str, data_dir=None, download: bool = False) -> Split:
    """The split (``"train"`` or ``"test"``) of dataset `name` from `source`, nothing read but its labels.

    ``"npz"`` looks in `data_dir` when given (nowhere else), else in `$EXTKD_DATA_DIR/<name>`, else in tfds
    (`download`: fetch and prepare it there when missing); `DataNotFoundError` when none has it."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known splits: {SPLITS}")
    if source == "sklearn":
        return _sklearn_split(name, split)
    from extkd_jax.data.tfds_split import TfdsNotFoundError, TfdsSplit  # lazy: it imports this module

    if source == "tfds":
        opened: Split = TfdsSplit(name, split, data_dir, download)
    elif source == "npz":
        folder, why = npz.locate(name, data_dir)
        if folder is not None:
            opened = NpzSplit(name, split, folder)
        elif data_dir:
            skipped = "not tried: data.dir is set"
            raise DataNotFoundError(missing_data_message(name, why, skipped, skipped))
        else:
            try:
                opened = TfdsSplit(name, split, None, download)
            except (FileNotFoundError, ImportError, ValueError) as err:
                reason = err.reason if isinstance(err, TfdsNotFoundError) else _short(err, 600)
                raise DataNotFoundError(missing_data_message(name, "not set", why, reason)) from None
    else:
        raise ValueError(f"unknown data source {source!r}; known sources: {SOURCES}")
    log.info("data %r %s: %s", name, split, opened.origin)
    return opened


def load_split(source: str, name: str, split: str, data_dir=None, download: bool = False) -> ArrayDataset:
    """One whole split in memory."""
    return open_split(source, name, split, data_dir, download).dataset()
