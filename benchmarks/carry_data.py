#!/usr/bin/env python3
"""CIFAR-10 in pieces that each fit one call of the device tool beside the working tree (64 MiB per call, all in).

    python benchmarks/carry_data.py [--src ../shared/data/cifar10] [--out .devdata] [--extra .devdata/teacher.tgz]

Why: ../shared/data/cifar10's train_0.npz alone is 56.2 MiB, and with the working tree (about 8.6 MiB) a call
carrying it is over the limit. Here the 50,000 training images become train_0/1/2.npz of 22,000, 22,000 and 6,000
images, in the original order (the npz source concatenates train_<k> parts in numeric order, so every run reads the
same training set and carves the same validation split), and test.npz is copied. Each call's payload is checked:
call 1 carries train_0, call 2 train_1, call 3 train_2 + test.npz + the wheelhouse + --extra (e.g. a teacher.tgz of an
earlier call). Prints the payloads; exits 1 when one is over --limit MiB.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SPLITS = (22000, 22000, 6000)  # training images per carried part, in order
MIB = 1 << 20


def working_tree_bytes(repo: Path = REPO) -> int:
    """Tracked and untracked-not-ignored files: what travels with every call."""
    listed = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum((repo / name.decode()).stat().st_size for name in listed if name and (repo / name.decode()).is_file())


def save_lzma(path: Path, **arrays: np.ndarray) -> None:
    """An npz with LZMA members, as ../shared's (np.savez_compressed's deflate is 20% larger on these images)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_LZMA) as archive:
        for key, value in arrays.items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(value), allow_pickle=False)


def split_train(src: Path, out: Path, sizes: tuple[int, ...] = SPLITS) -> list[Path]:
    """train_<k>.npz of `sizes` images from src's parts, concatenated in order; checked against the source."""
    parts = sorted(src.glob("train_*.npz"), key=lambda p: int(p.stem.split("_")[1]))
    x = np.concatenate([np.load(p)["x_train"] for p in parts])
    y = np.concatenate([np.load(p)["y_train"] for p in parts])
    if sum(sizes) != len(x):
        raise ValueError(f"{src}: {len(x)} training images; the pieces {sizes} add up to {sum(sizes)}")
    out.mkdir(parents=True, exist_ok=True)
    written, start = [], 0
    for k, n in enumerate(sizes):
        path = out / f"train_{k}.npz"
        save_lzma(path, x_train=x[start : start + n], y_train=y[start : start + n])
        written.append(path)
        start += n
    back = np.concatenate([np.load(p)["x_train"] for p in written])
    if not np.array_equal(back, x) or not np.array_equal(np.concatenate([np.load(p)["y_train"] for p in written]), y):
        raise RuntimeError(f"the pieces in {out} do not concatenate to {src}'s training set")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, default=REPO.parent / "shared" / "data" / "cifar10")
    p.add_argument("--out", type=Path, default=REPO / ".devdata")
    p.add_argument("--wheelhouse", type=Path, default=REPO / ".wheelhouse")
    p.add_argument("--extra", type=Path, action="append", default=[], help="another file for call 3 (teacher.tgz)")
    p.add_argument("--limit", type=float, default=63.0, help="MiB per call, working tree included")
    args = p.parse_args(argv)
    for old in args.out.glob("train_*.npz"):
        old.unlink()  # no stale part beside the new ones
    train = split_train(args.src, args.out)
    (args.out / "test.npz").unlink(missing_ok=True)  # a read-only copy of an earlier run
    shutil.copy(args.src / "test.npz", args.out / "test.npz")
    tree = working_tree_bytes()
    wheels = sum(w.stat().st_size for w in args.wheelhouse.glob("*.whl")) if args.wheelhouse.is_dir() else 0
    calls = [[train[0]], [train[1]], [train[2], args.out / "test.npz", *args.extra]]
    ok = True
    for i, files in enumerate(calls, 1):
        size = tree + sum(f.stat().st_size for f in files) + (wheels if i == 3 else 0)
        fits = size <= args.limit * MIB
        ok &= fits
        names = ", ".join(f.name for f in files) + (" + wheelhouse" if i == 3 else "")
        print(
            f"call {i}: {size / MIB:.1f} MiB ({names}; working tree {tree / MIB:.1f} MiB) {'ok' if fits else 'TOO BIG'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
