"""`extkd data prepare NAME --out=DIR [--from=PATH]`: a dataset's npz folder, the layout `extkd_jax.data.npz` reads.

It writes `DIR/NAME/` (or `DIR` itself when it is named NAME), local or gs:// (through `etils.epath`):
`train_<k>.npz` (x_train, y_train) parts and `test.npz` (x_test, y_test), images uint8 NHWC, labels uint8 (int32
above 255 classes), stored uncompressed so that a run memory-maps its rows. Each file is written to `<file>.tmp`
and then renamed: a reader never sees half a file. Sources:

- `--from` a CIFAR python tarball (`cifar-10-python.tar.gz`, `cifar-100-python.tar.gz`, as cs.toronto.edu and
  torchvision ship them), the folder holding it, or its extracted folder (`cifar-10-batches-py/`,
  `cifar-100-python/`). CIFAR-100 keeps its fine labels (100 classes);
- `--from` a folder with MNIST's (or Fashion-MNIST's) idx files, `train-images-idx3-ubyte[.gz]`,
  `train-labels-idx1-ubyte[.gz]`, `t10k-images-idx3-ubyte[.gz]`, `t10k-labels-idx1-ubyte[.gz]` (also found in
  torchvision's `MNIST/raw/`, `FashionMNIST/raw/` below it);
- no `--from`: tensorflow-datasets NAME (any dataset with fixed-size `image` and a `label`), prepared under
  `$TFDS_DATA_DIR` (default ~/tensorflow_datasets) or downloaded there (not with `--no-download`).

The CIFAR archives are Python 2 pickles, and unpickling can run code. They are read by `SafeArrayUnpickler`, whose
`find_class` admits only numpy's array reconstruction (`numpy.core.multiarray._reconstruct` or its numpy 2 name,
`numpy.ndarray`, `numpy.dtype`); dicts, lists, strings and numbers need no global. A pickle naming any other
global is refused (`UnsafePickleError`, naming the archive, the member and the global) before anything is called.
"""

from __future__ import annotations

import argparse
import gzip
import io
import pickle
import struct
import sys
import tarfile
import textwrap

import numpy as np
from etils import epath

CIFAR = {  # name: (tarball, folder inside it, train members, test member, label key, classes)
    "cifar10": (
        "cifar-10-python.tar.gz",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "labels",
        10,
    ),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ("train",), "test", "fine_labels", 100),
}
IDX_NAMES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}  # name: torchvision's folder
IDX_FILES = {
    "x_train": ("train-images-idx3-ubyte", 2051),
    "y_train": ("train-labels-idx1-ubyte", 2049),
    "x_test": ("t10k-images-idx3-ubyte", 2051),
    "y_test": ("t10k-labels-idx1-ubyte", 2049),
}
PART_SIZE = 25000  # examples per train_<k>.npz
SAFETY = (
    "CIFAR archives are Python pickles: they are read by a restricted unpickler that admits only numpy's array "
    "reconstruction (numpy _reconstruct, ndarray, dtype); a pickle naming any other global is refused, so no code "
    "in an archive runs"
)


class UnsafePickleError(ValueError):
    """A pickle names a global outside numpy's array reconstruction: refused, nothing called."""


_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's _reconstruct, whatever module numpy keeps it in
ADMITTED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class SafeArrayUnpickler(pickle.Unpickler):
    """Unpickles Python 2 pickles of dicts of numpy arrays and lists; any other global raises UnsafePickleError.

    `find_class` is the only way a pickle reaches a callable (GLOBAL, STACK_GLOBAL, INST, OBJ and the EXT opcodes all
    go through it), so admitting only numpy's array reconstruction means no code of the pickle's choosing runs."""

    def __init__(self, file, where: str):
        super().__init__(file, encoding="latin1")  # Python 2 str: numpy's raw bytes and the dict keys
        self.where = where

    def find_class(self, module: str, name: str):
        found = ADMITTED_GLOBALS.get((module, name))
        if found is None:
            raise UnsafePickleError(
                f"{self.where} names the global {module}.{name}; refused (only numpy's array reconstruction is "
                "admitted, so no code in the archive runs): is this the CIFAR archive from its official source?"
            )
        return found

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.where} uses a persistent id ({pid!r}); refused")


def load_pickle(data: bytes, where: str) -> dict:
    """The dict of a CIFAR batch pickle, keys as str, read by `SafeArrayUnpickler`."""
    try:
        value = SafeArrayUnpickler(io.BytesIO(data), where).load()
    except UnsafePickleError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged pickle fails in many ways
        raise ValueError(f"{where} is not a readable pickle ({type(err).__name__}: {err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where} holds a {type(value).__name__}, expected a dict with 'data' and labels")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in value.items()}


def _cifar_batch(data: bytes, where: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) from the CHW rows, labels) of one batch."""
    batch = load_pickle(data, where)
    if "data" not in batch or label_key not in batch:
        raise ValueError(f"{where} has keys {sorted(batch)}, expected 'data' and {label_key!r}")
    x, y = batch["data"], np.asarray(batch[label_key])
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        shape = getattr(x, "shape", None)
        raise ValueError(f"{where}: 'data' is {type(x).__name__} {shape}, expected a uint8 (N, 3072) array")
    if (
        y.shape != (len(x),)
        or not np.issubdtype(y.dtype, np.integer)
        or (y.size and not 0 <= y.min() <= y.max() < num_classes)
    ):
        raise ValueError(f"{where}: {label_key!r} is not {len(x)} class ids in [0, {num_classes})")
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y.astype(np.uint8)


def _cifar_members(path: epath.Path, name: str):
    """(where, read(member) -> bytes) of a CIFAR tarball, the folder holding it, or its extracted folder."""
    tarball, inner = CIFAR[name][:2]
    if path.is_dir():
        for folder in (path, path / inner):
            if (folder / CIFAR[name][3]).is_file():
                return str(folder), lambda member, f=folder: (f / member).read_bytes()
        if (path / tarball).is_file():
            path = path / tarball
        else:
            raise FileNotFoundError(f"--from={path}: holds neither {tarball} nor its extracted {inner}/")
    try:
        archive = tarfile.open(fileobj=io.BytesIO(path.read_bytes()), mode="r:*")
    except tarfile.TarError as err:
        raise ValueError(f"--from={path}: not a tar archive ({err}); expected {tarball}") from None

    def read(member: str) -> bytes:
        try:
            handle = archive.extractfile(f"{inner}/{member}")
        except KeyError:
            handle = None
        if handle is None:
            raise ValueError(f"{path}: no member {inner}/{member}; expected the archive {tarball}")
        return handle.read()

    return str(path), read


def read_cifar(path: epath.Path, name: str) -> dict[str, np.ndarray]:
    """x_train, y_train, x_test, y_test of a CIFAR python archive (see the module docstring)."""
    _, inner, train_members, test_member, label_key, num_classes = CIFAR[name]
    where, read = _cifar_members(path, name)
    parts = [_cifar_batch(read(m), f"{where}: member {inner}/{m}", label_key, num_classes) for m in train_members]
    x_test, y_test = _cifar_batch(read(test_member), f"{where}: member {inner}/{test_member}", label_key, num_classes)
    return {
        "x_train": np.concatenate([x for x, _ in parts]),
        "y_train": np.concatenate([y for _, y in parts]),
        "x_test": x_test,
        "y_test": y_test,
    }


def parse_idx(data: bytes, where: str, magic: int) -> np.ndarray:
    """An idx file's array: uint8 images (N, rows, cols) for magic 2051, labels (N,) for 2049 (big-endian header)."""
    dims = 3 if magic == 2051 else 1
    header = 4 * (1 + dims)
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
        raise ValueError(f"{where}: magic number {found}, expected {magic} (an idx{dims}-ubyte file)")
    shape = struct.unpack(f">{dims}I", data[4:header])
    if len(data) - header != int(np.prod(shape)):
        raise ValueError(f"{where}: {len(data) - header} bytes of data, expected {int(np.prod(shape))} for {shape}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def read_idx_folder(path: epath.Path, name: str) -> dict[str, np.ndarray]:
    """x_train, y_train, x_test, y_test of MNIST-style idx files (gzipped or not) in `path` or its `<NAME>/raw/`."""
    folders = [path, path / IDX_NAMES[name] / "raw", path / "raw"]
    out = {}
    for key, (stem, magic) in IDX_FILES.items():
        found = [f / n for f in folders for n in (stem + ".gz", stem) if (f / n).is_file()]
        if not found:
            raise FileNotFoundError(f"--from={path}: no {stem}.gz (nor {stem}); expected MNIST's four idx files")
        data = found[0].read_bytes()
        if found[0].name.endswith(".gz"):
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError) as err:
                raise ValueError(f"{found[0]}: not a readable gzip file ({err})") from None
        out[key] = parse_idx(data, str(found[0]), magic)
    for split in ("train", "test"):
        if len(out[f"x_{split}"]) != len(out[f"y_{split}"]):
            raise ValueError(
                f"--from={path}: {len(out[f'x_{split}'])} {split} images but {len(out[f'y_{split}'])} labels"
            )
    return out


def read_tfds(name: str, download: bool) -> dict[str, np.ndarray]:
    """x_train, y_train, x_test, y_test of a tfds dataset with fixed-size images (prepared, or downloaded)."""
    from extkd_jax.data.tfds_split import TfdsSplit

    out = {}
    for split in ("train", "test"):
        source = TfdsSplit(name, split, None, download)
        if source.image_shape is None:
            raise ValueError(
                f"tfds {name!r}: images differ in size, an npz folder cannot hold them; a run streams them from "
                "tfds itself (--config.data.source=tfds)"
            )
        images, labels = np.empty((len(source), *source.image_shape), np.uint8), np.empty(len(source), np.int64)
        for i in range(len(source)):  # each record decoded once
            image, labels[i] = source.record(i)
            images[i] = image.reshape(source.image_shape)
        out[f"x_{split}"], out[f"y_{split}"] = images, labels
    return out


def _save(path: epath.Path, **arrays: np.ndarray) -> None:
    """An uncompressed npz, written to a temporary sibling and renamed over `path`."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)


def write_npz_folder(folder: epath.Path, arrays: dict[str, np.ndarray], part_size: int = PART_SIZE) -> list[str]:
    """Writes `folder`'s train_<k>.npz parts and test.npz (refusing a folder that already holds npz files)."""
    if part_size < 1:
        raise ValueError(f"part size {part_size}: expected at least 1 example per train file")
    if folder.is_dir() and (old := sorted(p.name for p in folder.iterdir() if p.name.endswith(".npz"))):
        raise FileExistsError(f"{folder} already holds {', '.join(old[:4])}; delete them or choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    labels = {
        k: arrays[k].astype(np.uint8 if arrays[k].max(initial=0) < 256 else np.int32) for k in ("y_train", "y_test")
    }
    written = []
    for k, start in enumerate(range(0, len(arrays["x_train"]), part_size)):
        rows = slice(start, start + part_size)
        _save(folder / f"train_{k}.npz", x_train=arrays["x_train"][rows], y_train=labels["y_train"][rows])
        written.append(f"train_{k}.npz")
    _save(folder / "test.npz", x_test=arrays["x_test"], y_test=labels["y_test"])
    return [*written, "test.npz"]


def prepare(
    name: str, out: str, source: str | None = None, download: bool = True, part_size: int = PART_SIZE
) -> epath.Path:
    """Reads dataset `name` (from `source`, else tfds) and writes its npz folder under `out`; returns the folder."""
    if source:
        src = epath.Path(source).expanduser()
        if not src.exists():
            raise FileNotFoundError(f"--from={source}: no such file or folder")
        if name in CIFAR:
            arrays = read_cifar(src, name)
        elif name in IDX_NAMES:
            arrays = read_idx_folder(src, name)
        else:
            raise ValueError(
                f"--from reads {', '.join(CIFAR)} python tarballs and {', '.join(IDX_NAMES)} idx files, not {name!r}; "
                f"leave out --from to take {name!r} from tensorflow-datasets"
            )
    else:
        arrays = read_tfds(name, download)
    for split in ("train", "test"):
        x = arrays[f"x_{split}"]
        arrays[f"x_{split}"] = np.ascontiguousarray(x[..., None] if x.ndim == 3 else x)
    root = epath.Path(out).expanduser()
    folder = root if root.name == name else root / name
    files = write_npz_folder(folder, arrays, part_size)
    origin = f"`{source}`" if source else "tensorflow-datasets"
    readme = folder / "README.md"  # its first line is the note reports quote about the data (npz.folder_note)
    (tmp := folder / "README.md.tmp").write_text(
        f"# {name}, written by `extkd data prepare` from {origin}: the source's pixels, unchanged\n\n"
        f"{len(arrays['x_train'])} train images in {', '.join(files[:-1])}; {len(arrays['x_test'])} test images "
        "in test.npz (uint8 NHWC).\n"
    )
    tmp.replace(readme)
    x = arrays["x_train"]
    print(
        f"wrote {folder}: {len(x)} train images in {', '.join(files[:-1])}, {len(arrays['x_test'])} test images in "
        f"test.npz, images {'x'.join(map(str, x.shape[1:]))} uint8\nuse it: EXTKD_DATA_DIR={root} or "
        f"--config.data.dir={root}"
    )
    return folder


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="extkd data", description="Datasets for extkd runs.")
    commands = top.add_subparsers(dest="command", metavar="COMMAND")
    sub = commands.add_parser(
        "prepare",
        help="write a dataset's npz folder (from a CIFAR tarball, MNIST idx files or tfds)",
        description=__doc__.split("\n\n", 1)[1].split("\n\nThe CIFAR")[0] + "\n\n" + textwrap.fill(SAFETY + ".", 116),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument("name", metavar="NAME", help="cifar10, cifar100, mnist, fashion_mnist, or any tfds image dataset")
    sub.add_argument("--out", required=True, metavar="DIR", help="where to write NAME/ (local or gs://)")
    sub.add_argument("--from", dest="source", metavar="PATH", help="a CIFAR python tarball or an idx-files folder")
    sub.add_argument("--no-download", dest="download", action="store_false", help="tfds: use only prepared data")
    sub.add_argument("--part-size", type=int, default=PART_SIZE, help=f"examples per train_<k>.npz ({PART_SIZE})")
    return top


def main(argv: list[str]) -> int:
    """`extkd data ...`; its exit status."""
    top = parser()
    try:
        args = top.parse_args(argv)
    except SystemExit as stop:  # --help (0) or a bad flag (2, argparse printed why)
        return int(stop.code or 0)
    if args.command != "prepare":
        top.print_help(sys.stderr)
        return 2
    try:
        prepare(args.name, args.out, args.source, args.download, args.part_size)
    except (ValueError, OSError, ImportError) as err:
        from extkd_jax._extras import hint_for

        hint = hint_for(err, "extkd data prepare") if isinstance(err, ImportError) else None
        print(hint or f"extkd data prepare: error: {err}", file=sys.stderr)
        return 1
    return 0
