"""Augmentation (pure jax.numpy, run inside the jitted epoch) and per-channel statistics of a dataset.

Per-example randomness: ``keys = jax.random.split(key, N)`` and a vmap over the batch, so an example's result
depends only on `key` and its position in the (global) batch, never on the number of devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from extkd_jax.data.dataset import ArrayDataset

AUGMENTATIONS = ("cifar", "mnist", "none")
_PAD = {"cifar": 4, "mnist": 2}
_FLIP = {"cifar": True, "mnist": False}
_DEFAULT_AUGMENTATION = {
    "cifar10": "cifar",
    "cifar100": "cifar",
    "mnist": "mnist",
    "fashion_mnist": "mnist",
    "digits": "none",
}


def default_augmentation(name: str) -> str:
    """The augmentation kind used for dataset `name` ("cifar10" -> "cifar", "mnist" -> "mnist", "digits" -> "none")."""
    if name not in _DEFAULT_AUGMENTATION:
        raise ValueError(f"no default augmentation for dataset {name!r}; known names: {tuple(_DEFAULT_AUGMENTATION)}")
    return _DEFAULT_AUGMENTATION[name]


def channel_stats(ds: ArrayDataset, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) of `ds.images` in pixel units, float32 arrays of shape (C,).

    Computed in float64 numpy, chunk by chunk (no float copy of the whole set). A channel with zero spread gets
    std 1 so that normalising never divides by zero.
    """
    images = ds.images
    if len(ds) == 0:
        raise ValueError(f"channel_stats needs a non-empty dataset; {ds.name!r} has 0 examples")
    channels = images.shape[-1]
    total = np.zeros(channels, np.float64)
    total_sq = np.zeros(channels, np.float64)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].astype(np.float64)
        total += x.sum(axis=(0, 1, 2))
        total_sq += np.square(x).sum(axis=(0, 1, 2))
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    std = np.where(std > 1e-6, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def _shift_one(key, image, pad: int, flip: bool):
    """Random crop of the zero-padded image (a translation by up to `pad` pixels), then an optional flip."""
    height, width, channels = image.shape
    offset_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(offset_key, (2,), 0, 2 * pad + 1)
    padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    out = jax.lax.dynamic_slice(
        padded, (offsets[0], offsets[1], jnp.zeros((), offsets.dtype)), (height, width, channels)
    )
    if flip:
        out = jnp.where(jax.random.bernoulli(flip_key), out[:, ::-1, :], out)
    return out


def augment_batch(key, images_uint8, kind: str) -> jax.Array:
    """Augments a batch (N, H, W, C) of uint8 images; returns uint8 of the same shape.

    kind: "cifar" (random crop with 4-pixel zero padding + random horizontal flip), "mnist" (random translation
    by up to 2 pixels in each direction, zero fill, no flip) or "none" (identity). `kind` is a Python string
    (static under jit).
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; known kinds: {AUGMENTATIONS}")
    images = jnp.asarray(images_uint8)
    if images.ndim != 4:
        raise ValueError(f"augment_batch expects images (N, H, W, C), got shape {images.shape}")
    if images.dtype != jnp.uint8:
        raise ValueError(f"augment_batch expects uint8 images, got dtype {images.dtype}")
    if kind == "none":
        return images
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda k, im: _shift_one(k, im, _PAD[kind], _FLIP[kind]))(keys, images)
