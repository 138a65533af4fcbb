"""Augmentation (pure jax.numpy, run inside the jitted epoch) and per-channel statistics of a dataset.

Per-example randomness: ``keys = jax.random.split(key, N)`` and a vmap over the batch, so an example's result
depends only on `key` and its position in the (global) batch, never on the number of devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from extkd_jax.data.dataset import ArrayDataset

AUGMENTATIONS = ("cifar", "mnist", "flip", "none")  # the base kinds; "+auto", "+mixup", "+cutmix" add to them
EXTRAS = ("auto", "mixup", "cutmix")
_PAD = {"cifar": 4, "mnist": 2, "flip": 0}
_FLIP = {"cifar": True, "mnist": False, "flip": True}
_DEFAULT_AUGMENTATION = {
    "cifar10": "cifar",
    "cifar100": "cifar",
    "mnist": "mnist",
    "fashion_mnist": "mnist",
    "digits": "none",
    "imagenet2012": "flip",
    "imagenette": "flip",
}


def default_augmentation(name: str) -> str:
    """The augmentation kind used for dataset `name` ("cifar10" -> "cifar", "mnist" -> "mnist", "digits" -> "none")."""
    if name not in _DEFAULT_AUGMENTATION:
        raise ValueError(f"no default augmentation for dataset {name!r}; known names: {tuple(_DEFAULT_AUGMENTATION)}")
    return _DEFAULT_AUGMENTATION[name]


def channel_sums(images: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """(3, C) float64: per channel, the number of pixels, their sum and their sum of squares (pixel units),
    chunk by chunk (no float copy of the whole set). Sums of shards add up to the sums of the whole."""
    channels = images.shape[-1]
    out = np.zeros((3, channels), np.float64)
    out[0] = images.shape[0] * int(np.prod(images.shape[1:-1]))
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].astype(np.float64)
        out[1] += x.sum(axis=tuple(range(x.ndim - 1)))
        out[2] += np.square(x).sum(axis=tuple(range(x.ndim - 1)))
    return out


def stats_from_sums(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float32 of `channel_sums`; a channel with zero spread gets std 1 (no division by zero)."""
    count, total, total_sq = sums
    if not np.all(count > 0):
        raise ValueError("channel statistics of an empty set")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    return mean.astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32)


def channel_stats(ds: ArrayDataset, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) of `ds.images` in pixel units, float32 arrays of shape (C,), in float64 inside."""
    if len(ds) == 0:
        raise ValueError(f"channel_stats needs a non-empty dataset; {ds.name!r} has 0 examples")
    return stats_from_sums(channel_sums(ds.images, chunk))


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


def parse_augment(spec: str, dataset: str) -> tuple[str, bool, str]:
    """`data.augment` ("auto", "cifar", "cifar+auto+mixup", ...) -> (base kind, AutoAugment-style policy?, mix).

    The base kind and the policy run in the data pipeline (label-preserving); the mix ("none", "mixup", "cutmix")
    runs in the step, where teacher and student see the same mixed images and the labels become soft targets."""
    words = spec.split("+")
    base = default_augmentation(dataset) if words[0] == "auto" else words[0]
    extras = words[1:]
    if base not in AUGMENTATIONS or any(w not in EXTRAS for w in extras) or len(set(extras)) != len(extras):
        raise ValueError(
            f"data.augment={spec!r}: expected a base kind {('auto', *AUGMENTATIONS)} optionally "
            f"followed by '+' and extras from {EXTRAS}, e.g. 'cifar+auto+mixup'"
        )
    mixes = [w for w in extras if w in ("mixup", "cutmix")]
    if len(mixes) > 1:
        raise ValueError(f"data.augment={spec!r}: mixup and cutmix exclude each other")
    return base, "auto" in extras, mixes[0] if mixes else "none"


def augment_batch(key, images_uint8, kind: str) -> jax.Array:
    """Augments a batch (N, H, W, C) of uint8 images; returns uint8 of the same shape.

    kind: "cifar" (random crop with 4-pixel zero padding + random horizontal flip), "flip" (random horizontal
    flip only: ImageNet, after the host's crops), "mnist" (random translation
    by up to 2 pixels in each direction, zero fill, no flip) or "none" (identity), optionally followed by "+auto"
    (the AutoAugment-style policy of `data.mixing`). `kind` is a Python string (static under jit).
    """
    kind, auto = (kind[: -len("+auto")], True) if kind.endswith("+auto") else (kind, False)
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; known kinds: {AUGMENTATIONS}")
    images = jnp.asarray(images_uint8)
    if images.ndim != 4:
        raise ValueError(f"augment_batch expects images (N, H, W, C), got shape {images.shape}")
    if images.dtype != jnp.uint8:
        raise ValueError(f"augment_batch expects uint8 images, got dtype {images.dtype}")
    if kind != "none":
        keys = jax.random.split(key, images.shape[0])
        images = jax.vmap(lambda k, im: _shift_one(k, im, _PAD[kind], _FLIP[kind]))(keys, images)
    if auto:
        from extkd_jax.data.mixing import auto_policy

        images = auto_policy(jax.random.fold_in(key, 1), images)  # a stream apart from the shifts' keys
    return images
