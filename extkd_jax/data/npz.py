"""The npz source: a folder of `train_<k>.npz` parts (keys x_train, y_train) and `test.npz` (x_test, y_test).

Where a dataset's folder is (`locate`): `data_dir` (`--config.data.dir`, local or remote through `etils.epath`) is
the folder that holds `<name>/` or that folder itself; with no `data_dir`, `$EXTKD_DATA_DIR/<name>` (or
`$EXTKD_DATA_DIR` itself when its last component is `<name>`). Labels are read whole (they are small); images are read
by index: from a local file whose member is stored uncompressed (`np.savez`), only the requested rows are read
(memory-mapped), so each process of a multi-host run reads only its own shard; a compressed member
(`np.savez_compressed`) or a remote file is read whole once.
"""

from __future__ import annotations

import io
import os
import re
import struct
import zipfile
import zlib

import numpy as np
from etils import epath

_PART_RE = re.compile(r"^train_(\d+)\.npz$")
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # a zip local file header: the member's data follows it


ENV_VAR = "EXTKD_DATA_DIR"
LAYOUT = (
    "expected a folder with train_0.npz[, train_1.npz, ...] (keys x_train, y_train) and test.npz (keys x_test, "
    "y_test), uint8 images"
)


def locate(name: str, data_dir=None) -> tuple[epath.Path | None, str]:
    """(the folder holding npz dataset `name`, "") or (None, why it was not found); see the module docstring.

    `data_dir` given: that folder's `<name>/`, or the folder itself when it is named `<name>` or holds npz files.
    No `data_dir`: `$EXTKD_DATA_DIR/<name>`, or `$EXTKD_DATA_DIR` itself when it is named `<name>` (a folder of
    another dataset's files is not taken for `<name>`)."""
    if not name or not isinstance(name, str):
        raise ValueError(f"npz dataset name must be a non-empty str, got {name!r}")
    if data_dir:
        root = epath.Path(data_dir).expanduser()
        if (root / name).is_dir():
            return root / name, ""
        if root.is_dir() and (root.name == name or _has_npz_files(root)):
            return root, ""
        return None, f"no folder {root / name} (nor npz files in {root})"
    env = os.environ.get(ENV_VAR, "")
    if not env:
        return None, f"${ENV_VAR} is not set"
    root = epath.Path(env).expanduser()
    if (root / name).is_dir():
        return root / name, ""
    if root.name == name and root.is_dir():
        return root, ""
    return None, f"{ENV_VAR}={env}: no folder {root / name}"


def npz_folder(name: str, data_dir=None) -> epath.Path:
    """The folder holding the npz files of `name` (see `locate`); FileNotFoundError when there is none."""
    folder, why = locate(name, data_dir)
    if folder is None:
        raise FileNotFoundError(f"npz dataset {name!r}: {why}; {LAYOUT}")
    return folder


def folder_note(name: str, data_dir=None) -> str:
    """What the folder of npz dataset `name` says about itself: the first line of its README.md, without the
    heading marks (e.g. that its pixels were decoded from JPEG); "" when there is no such folder or README."""
    folder, _ = locate(name, data_dir)
    readme = folder / "README.md" if folder is not None else None
    if readme is None or not readme.is_file():
        return ""
    lines = [line.strip() for line in readme.read_text().splitlines() if line.strip()]
    return lines[0].lstrip("#").strip() if lines else ""


def _has_npz_files(folder: epath.Path) -> bool:
    return (folder / "test.npz").is_file() or (folder / "train.npz").is_file() or bool(_train_parts(folder))


def _train_parts(folder: epath.Path) -> list[epath.Path]:
    """train_<k>.npz files sorted by k (numerically, so train_10 comes after train_9)."""
    parts = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _PART_RE.match(p.name)) and p.is_file())
    indices = [k for k, _ in parts]
    if indices and indices != list(range(len(indices))):
        raise FileNotFoundError(
            f"train parts in {folder} are numbered {indices}; expected train_0.npz .. "
            f"train_{len(indices) - 1}.npz with no gap"
        )
    return [p for _, p in parts]


def split_files(folder: epath.Path, split: str) -> list[epath.Path]:
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


def _memory_map(path: epath.Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray | None:
    """The member as a read-only memory map, when it is stored uncompressed in a local file; else None."""
    if info.compress_type != zipfile.ZIP_STORED or "://" in str(path):
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        f.seek(info.header_offset + _LOCAL_HEADER.size + header[-2] + header[-1])
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if fortran or dtype.hasobject:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


class DamagedFileError(ValueError):
    """An npz file that cannot be read: empty, truncated, overwritten or corrupted."""


def read_member(path: epath.Path, key: str, mmap: bool = True) -> np.ndarray:
    """Array `key` of an npz file: memory-mapped when possible (and `mmap`), else read whole (its CRC checked)."""
    try:
        with path.open("rb") as raw, zipfile.ZipFile(raw) as zf:
            names = [n.removesuffix(".npy") for n in zf.namelist()]
            if key not in names:
                # ValueError (not KeyError): a bad input file, reported like the other data errors
                raise ValueError(f"{path} has no array {key!r}; it holds {sorted(names)}")
            info = zf.getinfo(key + ".npy")
            mapped = _memory_map(path, zf, info) if mmap else None
            if mapped is not None:
                return mapped
            return np.load(io.BytesIO(zf.read(info)), allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, struct.error, ValueError, zlib.error) as err:
        if isinstance(err, ValueError) and str(path) in str(err):
            raise
        raise DamagedFileError(
            f"{path} cannot be read as an npz file ({type(err).__name__}: {err}); it is damaged (empty, truncated "
            "or overwritten): copy it again from its source"
        ) from None
