"""Writes a small learnable CIFAR-shaped dataset (32x32x3 uint8, 10 classes) in the npz layout of `data.dir`.

For runs that must not read real data (CI, `benchmarks/device_check.sh --cpu`): each class is a fixed random
pattern plus noise, so a few epochs learn it and a dropped class can still be recognised.

    python benchmarks/synthetic_cifar.py DIR [--train 2000] [--test 500]
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np


def write(folder: pathlib.Path, n_train: int = 2000, n_test: int = 500, seed: int = 0) -> pathlib.Path:
    rng = np.random.default_rng(seed)
    patterns = rng.uniform(0, 255, size=(10, 32, 32, 3))

    def make(n: int):
        labels = rng.permutation(np.arange(n) % 10)
        images = np.clip(patterns[labels] + rng.normal(0, 60, size=(n, 32, 32, 3)), 0, 255).astype(np.uint8)
        return images, labels.astype(np.uint8)

    folder.mkdir(parents=True, exist_ok=True)
    x, y = make(n_train)
    np.savez(folder / "train_0.npz", x_train=x, y_train=y)
    x, y = make(n_test)
    np.savez(folder / "test.npz", x_test=x, y_test=y)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=pathlib.Path)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=500)
    args = parser.parse_args()
    print(write(args.dir, args.train, args.test))
