"""The pixel convention a model was trained on (its card's `input`), and the check of images against it.

Every data source feeds the engine uint8 pixel values 0..255 (sklearn's 0..16 digits are scaled as
`x * 255 // 16`; torchvision imports keep torchvision's normalisation on the 0..255 scale), and each network
normalises them itself. A model fed another convention (floats in [0, 1], raw 0..16 digits) still returns logits,
only wrong ones (digits as they come: 21.8% instead of 92.8%), so `TrainedModel` refuses them, naming the range
found and the one expected.
"""

from __future__ import annotations

import numpy as np

# what cards written before the `input` field was recorded mean: every source has always been uint8 0..255
DEFAULT_INPUT = {"dtype": "uint8", "range": [0, 255]}
# sources whose raw values are on another scale, and how the engine rescaled them to 0..255
SOURCE_SCALES = {("sklearn", "digits"): {"source_range": [0, 16], "scaling": "x * 255 // 16"}}


def input_convention(data_config) -> dict:
    """The card's `input` record for a run on `data_config`: dtype, value range, and a source's own scale."""
    return {**DEFAULT_INPUT, **SOURCE_SCALES.get((data_config.source, data_config.name), {})}


def check_pixel_range(images: np.ndarray, convention: dict | None) -> None:
    """Raises ValueError if `images` cannot be pixel values of `convention` (the card's `input`, DEFAULT_INPUT
    if None): values outside its range, floats scaled to [0, 1], or a source's raw scale (digits' 0..16)."""
    convention = convention or DEFAULT_INPUT
    if images.size == 0:
        return
    lo, hi = convention["range"]
    low, high = float(np.min(images)), float(np.max(images))
    expected = f"this model was trained on {convention['dtype']} pixel values in [{lo}, {hi}]"
    skip = "; pass check_range=False to feed them anyway"
    found = f"images with values in [{low:g}, {high:g}] ({images.dtype})"
    if not np.isfinite(low) or not np.isfinite(high) or low < lo or high > hi:
        raise ValueError(f"{found}: {expected}{skip}")
    if np.issubdtype(images.dtype, np.floating) and 0 < high <= 1.0 < hi:
        raise ValueError(f"{found} look scaled to [0, 1]: {expected}; multiply them by {hi}{skip}")
    source = convention.get("source_range")
    if source and 0 < high <= source[1] < hi:
        raise ValueError(
            f"{found} look like the source's raw values (range {source}): {expected}; scale them as "
            f"{convention.get('scaling', 'the training data was')}{skip}"
        )
