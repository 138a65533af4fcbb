"""Where images come from: one `Split` per (source, dataset, split), read by index.

- ``"npz"``: a folder of `.npz` files (see `extkd_jax.data.npz`), images memory-mapped when stored uncompressed;
- ``"tfds"``: ``tfds.data_source(name, split=..., data_dir=..., download=False)`` (ArrayRecord files, no
  TensorFlow needed), prepared beforehand; records are decoded one at a time (variable-size images allowed);
- ``"sklearn"``: ``name="digits"``, scikit-learn's bundled 8x8 digits (1797 images, values 0..16), scaled to
  uint8 as ``x * 255 // 16`` with shape (N, 8, 8, 1); the first 1200 images are train, the last 597 test.

A `Split` has `labels` (read whole: the experiment plans its splits from them), `read(indices)` (images, uint8
NHWC) and `bytes_read`: the image bytes this process has loaded from storage (rows of a memory map, whole members
read at once, decoded records), for checking that each process reads only its share.
"""

from __future__ import annotations

import functools

import numpy as np

from extkd_jax.data import npz
from extkd_jax.data.dataset import ArrayDataset

SOURCES = ("npz", "tfds", "sklearn")
SPLITS = ("train", "test")
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


class TfdsSplit(Split):
    """A prepared tfds split (ArrayRecord), decoded record by record."""

    def __init__(self, name: str, split: str, data_dir):
        super().__init__()
        if name not in TFDS_NAMES:
            raise ValueError(f"unknown tfds dataset {name!r}; known tfds names: {TFDS_NAMES}")
        try:
            import tensorflow_datasets as tfds  # lazy: the [tfds] extra
        except ImportError as err:
            raise ImportError("data.source='tfds' needs tensorflow-datasets: pip install 'extkd_jax[tfds]'") from err
        tfds_split = TFDS_SPLITS.get(name, {}).get(split, split)
        try:
            self.source = tfds.data_source(name, split=tfds_split, data_dir=data_dir or None, download=False)
        except Exception as err:  # noqa: BLE001 - tfds reports an unprepared dataset in many ways (KeyError too)
            raise FileNotFoundError(
                f"tfds dataset {name!r} split {tfds_split!r} is not prepared in ArrayRecord format under data_dir "
                f"{data_dir or '(TFDS default)'}; prepare it with `tfds build {name} --file_format=array_record "
                f"--data_dir=...` on a machine with internet, or use source 'npz' ({type(err).__name__}: {err})"
            ) from err
        if len(self.source) == 0:
            raise ValueError(f"tfds dataset {name!r} split {tfds_split!r} is empty")
        self.name = name
        self.num_classes = KNOWN_NUM_CLASSES.get(name, 0)
        info = getattr(self.source, "dataset_info", None)
        try:
            self.num_classes = int(info.features["label"].num_classes)
        except (KeyError, AttributeError, TypeError):
            pass
        shape = None
        try:
            shape = tuple(info.features["image"].shape)
        except (KeyError, AttributeError, TypeError):
            pass
        self.image_shape = shape if shape and None not in shape else None
        if self.image_shape is not None and len(self.image_shape) == 2:
            self.image_shape = (*self.image_shape, 1)

    def __len__(self) -> int:
        return len(self.source)

    @functools.cached_property
    def labels(self) -> np.ndarray:
        # one record at a time: batched reads (`__getitems__`) are not supported by every data source (the mock)
        return _as_int32_labels(
            np.asarray([int(self.source[i]["label"]) for i in range(len(self.source))]), f"tfds {self.name!r}"
        )

    def record(self, index: int) -> tuple[np.ndarray, int]:
        """(image HWC uint8, label) of one example."""
        record = self.source[int(index)]
        image = np.asarray(record["image"], np.uint8)
        image = image[..., None] if image.ndim == 2 else image
        self.bytes_read += image.nbytes
        return image, int(record["label"])

    def read_one(self, index: int) -> np.ndarray:
        return self.record(index)[0]

    def _read(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices), *self.image_shape), np.uint8)
        for i, index in enumerate(indices):
            out[i] = self.record(index)[0].reshape(self.image_shape)
        return out


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


def open_split(source: str, name: str, split: str, data_dir=None) -> Split:
    """The split (``"train"`` or ``"test"``) of dataset `name` from `source`, nothing read but its labels."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known splits: {SPLITS}")
    if source == "npz":
        return NpzSplit(name, split, data_dir)
    if source == "tfds":
        return TfdsSplit(name, split, data_dir)
    if source == "sklearn":
        return _sklearn_split(name, split)
    raise ValueError(f"unknown data source {source!r}; known sources: {SOURCES}")


def load_split(source: str, name: str, split: str, data_dir=None) -> ArrayDataset:
    """One whole split in memory."""
    return open_split(source, name, split, data_dir).dataset()
