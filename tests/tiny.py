"""Tiny synthetic data and configs shared by the engine tests (no download, no ../shared)."""

from __future__ import annotations

import pathlib
import sys

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def write_tiny_npz(
    folder: pathlib.Path,
    n_train: int = 400,
    n_test: int = 100,
    size: int = 8,
    channels: int = 1,
    num_classes: int = 10,
    seed: int = 0,
) -> pathlib.Path:
    """A learnable toy dataset in the `../shared/data` format: each class is a noisy fixed pattern."""
    rng = np.random.default_rng(seed)
    patterns = rng.uniform(0, 255, size=(num_classes, size, size, channels))

    def make(n):
        labels = np.arange(n) % num_classes
        rng.shuffle(labels)
        images = patterns[labels] + rng.normal(0, 40, size=(n, size, size, channels))
        images = np.clip(images, 0, 255).astype(np.uint8)
        return (images[..., 0] if channels == 1 else images), labels.astype(np.uint8)

    folder.mkdir(parents=True, exist_ok=True)
    x, y = make(n_train)
    half = n_train // 2
    np.savez(folder / "train_0.npz", x_train=x[:half], y_train=y[:half])
    np.savez(folder / "train_1.npz", x_train=x[half:], y_train=y[half:])
    x, y = make(n_test)
    np.savez(folder / "test.npz", x_test=x, y_test=y)
    return folder


def tiny_config(data_dir: pathlib.Path, **overrides):
    """An MLP config on the tiny data: a few hundred steps take seconds."""
    from extkd_jax.configs import base

    c = base.get_config()
    c.data.source = "npz"
    c.data.name = "mnist"
    c.data.dir = str(data_dir)
    c.data.val_size = 50
    c.data.augment = "mnist"
    c.model.name = "mlp"
    c.model.kwargs.hidden_sizes = (32, 32)
    c.model.kwargs.input_size = 64
    c.model.kwargs.dropout = 0.1
    c.batch_size = 50
    c.eval_batch_size = 100
    c.num_epochs = 3
    c.optim.learning_rate = 0.05
    c.progress = False
    for key, value in overrides.items():
        target = c
        *path, last = key.split(".")
        for p in path:
            target = target[p]
        if last not in target and path[1:2] != ["kwargs"]:  # a renamed key must not pass silently
            raise KeyError(f"tiny_config: {key!r} is not a config key")
        target[last] = value
    return c


def random_teacher(
    name: str = "resnet8", channels: int = 3, seed: int = 5, dtype=None, mean: float = 120.0, std: float = 60.0
):
    """(Network, variables) of an untrained model used as a frozen teacher by the step tests."""
    import jax.numpy as jnp

    from extkd_jax.train.setup import build_model
    from extkd_jax.train.step import Network, split

    dtype = dtype or jnp.float32
    graph, variables = split(build_model(name, {}, 10, seed, dtype))
    return Network(graph, np.full(channels, mean, np.float32), np.full(channels, std, np.float32), dtype), variables


def tiny_setup(
    config, input_shape, steps_per_epoch: int, teacher=None, mean: float = 120.0, std: float = 60.0, train_labels=None
):
    """`train.setup.build` with fixed normalisation statistics (what the loop computes from the data)."""
    from extkd_jax.train.setup import build

    channels = input_shape[-1]
    return build(
        config,
        10,
        tuple(input_shape),
        steps_per_epoch,
        np.full(channels, mean, np.float32),
        np.full(channels, std, np.float32),
        teacher,
        train_labels,
    )


def resnet8_step_setup(fold_batchnorm: bool = True):
    """Config, random teacher and 64 random 8x8 RGB images for the few-step mesh checks (resnet8 -> resnet8,
    extended_kd, batch 16): the same work on every mesh, so results compare across device counts and hosts."""
    import jax.numpy as jnp

    config = tiny_config(
        ".",
        **{
            "model.name": "resnet8",
            "loss.name": "extended_kd",
            "batch_size": 16,
            "data.augment": "cifar",
            "teacher.fold_batchnorm": fold_batchnorm,
        },
    )
    config.model.kwargs = {}
    teacher = random_teacher("resnet8", dtype=jnp.float32)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(64,)).astype(np.int32)
    return config, teacher, images, labels


def build_wheel(dest: pathlib.Path) -> pathlib.Path:
    """The project's wheel built from this checkout into `dest` (no dependencies, no network)."""
    import subprocess

    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), str(REPO_ROOT)]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = pathlib.Path(dest).glob("extkd_jax-*.whl")
    return wheel
