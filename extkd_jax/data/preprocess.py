"""Host-side preprocessing of one image for the stream pipeline: fixed-size sets pass through (they are augmented
on the device, like the device-resident pipeline), variable-size ones (ImageNet) are cropped to a fixed size.

ImageNet, as torchvision and the KD papers train it: training images get a random resized crop (scale 0.08-1,
aspect ratio 3/4-4/3) to `size`; evaluation images are resized so the shorter side is `size * 256 / 224` and
centre-cropped to `size`. The horizontal flip runs on the device (`data.augment='flip'`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

RESIZE_RATIO = 256 / 224  # evaluation: shorter side resized to this times the crop size


def _pil():
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError("resizing images needs Pillow: pip install 'extkd_jax[plots]'") from err
    return Image


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    pil = _pil().fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out = np.asarray(pil.resize((width, height), _pil().BILINEAR))
    return out[..., None] if out.ndim == 2 else out


def random_resized_crop(
    image: np.ndarray, size: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> np.ndarray:
    """torchvision's RandomResizedCrop: a random area fraction and aspect ratio, 10 tries, else the centre crop."""
    height, width = image.shape[:2]
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return _resize(image[top : top + h, left : left + w], size, size)
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return _resize(image[top : top + side, left : left + side], size, size)


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    height, width = image.shape[:2]
    short = round(size * RESIZE_RATIO)
    scale = short / min(height, width)
    resized = _resize(image, max(short, round(height * scale)), max(short, round(width * scale)))
    top, left = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
    return resized[top : top + size, left : left + size]


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """`crop_size` 0: images pass through unchanged (a fixed-size set); else the ImageNet crops above."""

    crop_size: int = 0

    def train(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return image if not self.crop_size else random_resized_crop(image, self.crop_size, rng)

    def eval(self, image: np.ndarray) -> np.ndarray:
        return image if not self.crop_size else resize_center_crop(image, self.crop_size)

    def shape(self, image_shape: tuple[int, ...] | None) -> tuple[int, ...]:
        """The shape of a preprocessed image."""
        if self.crop_size:
            channels = image_shape[-1] if image_shape else 3
            return (self.crop_size, self.crop_size, channels)
        if image_shape is None:
            raise ValueError("images of different sizes need data.crop_size > 0 (the stream pipeline's crops)")
        return tuple(image_shape)
