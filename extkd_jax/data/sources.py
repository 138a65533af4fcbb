"""Loading whole splits into `ArrayDataset`s from three sources.

- ``"npz"``: a folder laid out like ``shared/data/<name>/``: ``train_0.npz``, ``train_1.npz``, ... (keys
  ``x_train``, ``y_train``; the parts are concatenated in numeric order; a single ``train.npz`` is also accepted)
  and ``test.npz`` (keys ``x_test``, ``y_test``). ``data_dir`` is either the folder that holds ``<name>/`` or that
  folder itself. With ``data_dir=None`` (or ``""``) the root is ``$EXTKD_DATA_DIR``, else ``./data``.
- ``"tfds"``: ``tfds.data_source(name, split=..., data_dir=data_dir, download=False)`` (ArrayRecord files, no
  TensorFlow needed). The data must already be prepared in ``data_dir`` (TFDS's default when None).
- ``"sklearn"``: ``name="digits"``, scikit-learn's bundled 8x8 digits (1797 images, values 0..16), scaled to
  uint8 as ``x * 255 // 16`` with shape (N, 8, 8, 1). Fixed split rule: the first 1200 images (in scikit-learn's
  order) are train and the last 597 are test (both close to class-balanced: 117..123 and 55..62 per class).
"""

from __future__ import annotations

import os
import pathlib
import re

import numpy as np

from extkd_jax.data.dataset import ArrayDataset

SOURCES = ("npz", "tfds", "sklearn")
SPLITS = ("train", "test")
TFDS_NAMES = ("cifar10", "cifar100", "mnist", "fashion_mnist")
SKLEARN_NAMES = ("digits",)
# Number of classes of the datasets we know; other npz datasets use max label + 1 over all their files.
KNOWN_NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100, "digits": 10}

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

_PART_RE = re.compile(r"^train_(\d+)\.npz$")


def class_names(name: str, num_classes: int) -> list[str]:
    """Readable class names of a dataset ("cat", ...), else the class indices as strings."""
    names = CLASS_NAMES.get(name)
    return list(names) if names and len(names) == num_classes else [str(i) for i in range(num_classes)]


def load_split(source: str, name: str, split: str, data_dir=None) -> ArrayDataset:
    """Loads one whole split (``"train"`` or ``"test"``) of dataset `name` from `source` into memory."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known splits: {SPLITS}")
    if source == "npz":
        return _load_npz(name, split, data_dir)
    if source == "tfds":
        return _load_tfds(name, split, data_dir)
    if source == "sklearn":
        return _load_sklearn(name, split)
    raise ValueError(f"unknown data source {source!r}; known sources: {SOURCES}")


# ----------------------------------------------------------------------------------------------------------- npz


def npz_folder(name: str, data_dir=None) -> pathlib.Path:
    """The folder holding the npz files of `name` (see the module docstring for the rule)."""
    if not name or not isinstance(name, str):
        raise ValueError(f"npz dataset name must be a non-empty str, got {name!r}")
    root = pathlib.Path(data_dir) if data_dir else pathlib.Path(os.environ.get("EXTKD_DATA_DIR", "data"))
    root = root.expanduser()
    if (root / name).is_dir():
        return root / name
    if root.is_dir() and (root.name == name or _has_npz_files(root)):
        return root
    raise FileNotFoundError(
        f"npz dataset {name!r}: no folder {root / name} (nor npz files in {root}); expected a folder with "
        f"train_0.npz[, train_1.npz, ...] (keys x_train, y_train) and test.npz (keys x_test, y_test)"
    )


def _has_npz_files(folder: pathlib.Path) -> bool:
    return (folder / "test.npz").is_file() or (folder / "train.npz").is_file() or bool(_train_parts(folder))


def _train_parts(folder: pathlib.Path) -> list[pathlib.Path]:
    """train_<k>.npz files sorted by k (numerically, so train_10 comes after train_9)."""
    parts = []
    for p in folder.iterdir():
        m = _PART_RE.match(p.name)
        if m and p.is_file():
            parts.append((int(m.group(1)), p))
    parts.sort()
    indices = [k for k, _ in parts]
    if indices and indices != list(range(len(indices))):
        raise FileNotFoundError(
            f"train parts in {folder} are numbered {indices}; expected train_0.npz .. train_{len(indices) - 1}.npz "
            f"with no gap"
        )
    return [p for _, p in parts]


def _split_files(folder: pathlib.Path, split: str) -> list[pathlib.Path]:
    if split == "test":
        path = folder / "test.npz"
        if not path.is_file():
            raise FileNotFoundError(f"missing {path}; expected test.npz with keys x_test, y_test")
        return [path]
    parts = _train_parts(folder)
    if parts:
        return parts
    if (folder / "train.npz").is_file():
        return [folder / "train.npz"]
    raise FileNotFoundError(
        f"no train files in {folder}; expected train_0.npz[, train_1.npz, ...] (or train.npz) with keys x_train, "
        "y_train"
    )


def _read_member(npz, path: pathlib.Path, key: str) -> np.ndarray:
    if key not in npz.files:
        # ValueError (not KeyError): a bad input file, reported like the other data errors
        raise ValueError(f"{path} has no array {key!r}; it holds {sorted(npz.files)}")
    return npz[key]


def _npz_num_classes(name: str, folder: pathlib.Path) -> int:
    if name in KNOWN_NUM_CLASSES:
        return KNOWN_NUM_CLASSES[name]
    top = -1
    for split in SPLITS:
        try:
            files = _split_files(folder, split)
        except FileNotFoundError:
            continue
        for path in files:
            with np.load(path) as npz:
                y = _read_member(npz, path, f"y_{split}")
                if y.size:
                    top = max(top, int(np.max(y)))
    return max(top + 1, 1)


def _load_npz(name: str, split: str, data_dir) -> ArrayDataset:
    folder = npz_folder(name, data_dir)
    images, labels = [], []
    num_classes = _npz_num_classes(name, folder)
    for path in _split_files(folder, split):
        with np.load(path) as npz:
            x = _read_member(npz, path, f"x_{split}")
            y = _read_member(npz, path, f"y_{split}")
        x, y = _as_nhwc_uint8(x, str(path)), _as_int32_labels(y, str(path))
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{path}: {x.shape[0]} images but {y.shape[0]} labels, expected the same number")
        if y.size and int(y.max()) >= num_classes:
            raise ValueError(
                f"{path}: label {int(y.max())} out of range [0, {num_classes}) for dataset {name!r} "
                f"({num_classes} classes)"
            )
        images.append(x)
        labels.append(y)
    shapes = {im.shape[1:] for im in images}
    if len(shapes) > 1:
        raise ValueError(f"npz dataset {name!r} {split}: parts have different image shapes {sorted(shapes)}")
    x = images[0] if len(images) == 1 else np.concatenate(images)
    y = labels[0] if len(labels) == 1 else np.concatenate(labels)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"npz dataset {name!r} {split}: {x.shape[0]} images but {y.shape[0]} labels")
    return ArrayDataset(x, y, num_classes, name)


def _as_nhwc_uint8(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype != np.uint8:
        raise ValueError(f"{where}: images dtype {x.dtype}, expected uint8")
    if x.ndim == 3:  # grayscale (N, H, W)
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"{where}: images shape {x.shape}, expected (N, H, W) or (N, H, W, C)")
    return np.ascontiguousarray(x)


def _as_int32_labels(y: np.ndarray, where: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:  # keras-style (N, 1)
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{where}: labels shape {y.shape}, expected (N,)")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: labels dtype {y.dtype}, expected an integer dtype")
    if y.size and (int(y.min()) < 0 or int(y.max()) > np.iinfo(np.int32).max):
        raise ValueError(f"{where}: labels range [{int(y.min())}, {int(y.max())}], expected class ids in [0, 2**31)")
    return y.astype(np.int32)


# ---------------------------------------------------------------------------------------------------------- tfds


def _load_tfds(name: str, split: str, data_dir) -> ArrayDataset:
    if name not in TFDS_NAMES:
        raise ValueError(f"unknown tfds dataset {name!r}; known tfds names: {TFDS_NAMES}")
    import tensorflow_datasets as tfds  # lazy: optional dependency, absent from the GPU image

    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except (NotImplementedError, AssertionError, FileNotFoundError, OSError, ValueError) as err:
        raise FileNotFoundError(
            f"tfds dataset {name!r} split {split!r} is not prepared in ArrayRecord format under data_dir "
            f"{data_dir or '(TFDS default)'}; prepare it with `tfds build {name} --file_format=array_record "
            f"--data_dir=...` on a machine with internet, or use source 'npz' ({type(err).__name__}: {err})"
        ) from err
    n = len(source)
    num_classes = KNOWN_NUM_CLASSES[name]
    info = getattr(source, "dataset_info", None)
    if info is not None:
        try:
            num_classes = int(info.features["label"].num_classes)
        except (KeyError, AttributeError, TypeError):
            pass
    if n == 0:
        raise ValueError(f"tfds dataset {name!r} split {split!r} is empty")
    # One record at a time: batched reads (`__getitems__`) are not supported by every data source (e.g. the mock).
    first = source[0]
    image0 = np.asarray(first["image"])
    if image0.ndim == 2:
        image0 = image0[..., None]
    images = np.empty((n,) + image0.shape, dtype=np.uint8)
    labels = np.empty((n,), dtype=np.int64)
    for i in range(n):
        record = first if i == 0 else source[i]
        image = np.asarray(record["image"])
        images[i] = image.reshape(image0.shape)
        labels[i] = int(record["label"])
    where = f"tfds {name!r} {split}"
    return ArrayDataset(images, _as_int32_labels(labels, where), num_classes, name)


# ------------------------------------------------------------------------------------------------------- sklearn


def _load_sklearn(name: str, split: str) -> ArrayDataset:
    if name not in SKLEARN_NAMES:
        raise ValueError(f"unknown sklearn dataset {name!r}; known sklearn names: {SKLEARN_NAMES}")
    from sklearn.datasets import load_digits  # lazy: only this source needs scikit-learn

    digits = load_digits()
    x = (digits.images.astype(np.int64) * 255 // 16).astype(np.uint8)[..., None]  # (1797, 8, 8, 1)
    y = digits.target.astype(np.int32)
    sl = slice(0, DIGITS_NUM_TRAIN) if split == "train" else slice(DIGITS_NUM_TRAIN, None)
    return ArrayDataset(np.ascontiguousarray(x[sl]), np.ascontiguousarray(y[sl]), KNOWN_NUM_CLASSES[name], name)
