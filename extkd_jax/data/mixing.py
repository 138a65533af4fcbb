"""Batch-level input transforms that run inside the jitted step (pure jax.numpy): mixup, CutMix, rotations, and
an AutoAugment-style policy. Mixing returns soft targets, so the loss takes them as labels.

Images are pixel values, float (N, H, W, C); targets are (N, num_classes) probabilities.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mixup(key: jax.Array, images: jax.Array, targets: jax.Array, alpha: float):
    """Zhang et al. (2018): ``lam x + (1 - lam) x[perm]`` with one ``lam ~ Beta(alpha, alpha)`` for the batch.
    Returns (images, targets, lam, perm)."""
    lam_key, perm_key = jax.random.split(key)
    lam = jax.random.beta(lam_key, alpha, alpha)
    perm = jax.random.permutation(perm_key, images.shape[0])
    return lam * images + (1 - lam) * images[perm], lam * targets + (1 - lam) * targets[perm], lam, perm


def cutmix(key: jax.Array, images: jax.Array, targets: jax.Array, alpha: float):
    """Yun et al. (2019): a box of area ``1 - lam`` (``lam ~ Beta(alpha, alpha)``) pasted from ``x[perm]``; the
    targets mix by the box's exact area. Returns (images, targets, lam, perm)."""
    lam_key, perm_key, y_key, x_key = jax.random.split(key, 4)
    lam = jax.random.beta(lam_key, alpha, alpha)
    perm = jax.random.permutation(perm_key, images.shape[0])
    height, width = images.shape[1:3]
    cut_h = jnp.round(height * jnp.sqrt(1 - lam)).astype(jnp.int32)
    cut_w = jnp.round(width * jnp.sqrt(1 - lam)).astype(jnp.int32)
    cy, cx = jax.random.randint(y_key, (), 0, height), jax.random.randint(x_key, (), 0, width)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h - cut_h // 2, 0, height)
    left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w - cut_w // 2, 0, width)
    box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    mixed = jnp.where(box[None, :, :, None], images[perm], images)
    kept = 1.0 - jnp.mean(box.astype(jnp.float32))
    return mixed, kept * targets + (1 - kept) * targets[perm], kept, perm


def rotate90(images: jax.Array, turns: jax.Array) -> jax.Array:
    """Each image (N, H, W, C), H == W, turned by `turns[i]` quarter turns counter-clockwise."""
    options = jnp.stack([jnp.rot90(images, k, axes=(1, 2)) for k in range(4)])  # (4, N, H, W, C)
    return jnp.take_along_axis(options, turns[None, :, None, None, None] % 4, axis=0)[0]


# An AutoAugment-style policy (the "JDA" of the data-augmentation-in-KD paper): every op applies to every image with
# probability AUTO_PROBABILITY at a fixed magnitude, in this order. Label-preserving, on uint8 pixel values.
AUTO_PROBABILITY = 0.3


def _blend(a, b, factor):
    return jnp.clip(b + factor * (a - b), 0, 255)


def _eighth(size: int) -> int:
    return max(1, size // 8)


def _grey(x):
    return jnp.mean(x, axis=-1, keepdims=True) if x.shape[-1] == 3 else x


AUTO_OPS = {
    "autocontrast": lambda x: (
        (x - x.min((0, 1), keepdims=True))
        * (255.0 / jnp.maximum(x.max((0, 1), keepdims=True) - x.min((0, 1), keepdims=True), 1.0))
    ),
    "contrast": lambda x: _blend(x, jnp.mean(_grey(x)), 1.5),
    "brightness": lambda x: _blend(x, jnp.zeros_like(x), 1.3),
    "color": lambda x: _blend(x, _grey(x), 1.5),
    "solarize": lambda x: jnp.where(x >= 192, 255.0 - x, x),
    "posterize": lambda x: jnp.floor(x / 32.0) * 32.0,
    "invert": lambda x: 255.0 - x,
    # an eighth of the image (at least a pixel), the vacated side zero-filled
    "translate_x": lambda x: jnp.roll(x, _eighth(x.shape[1]), axis=1).at[:, : _eighth(x.shape[1])].set(0.0),
    "translate_y": lambda x: jnp.roll(x, _eighth(x.shape[0]), axis=0).at[: _eighth(x.shape[0])].set(0.0),
}


def auto_policy(key: jax.Array, images_uint8: jax.Array) -> jax.Array:
    """The policy above on a batch of uint8 images (N, H, W, C); returns uint8."""

    def one(key, image):
        x = image.astype(jnp.float32)
        for k, op in zip(jax.random.split(key, len(AUTO_OPS)), AUTO_OPS.values(), strict=True):
            x = jnp.where(jax.random.bernoulli(k, AUTO_PROBABILITY), op(x), x)
        return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)

    return jax.vmap(one)(jax.random.split(key, images_uint8.shape[0]), images_uint8)
