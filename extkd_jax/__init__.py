"""extkd_jax: knowledge distillation of image classifiers in JAX / Flax NNX.

Importing the package imports nothing heavy: `from extkd_jax.losses import kd_kl` needs only jax and chex.
`extkd_jax.load(workdir)` (the training extras) returns a trained model callable on raw images.
"""

from __future__ import annotations

__version__ = "0.2.0"


def load(workdir, dtype: str | None = None):
    """The trained model of an `extkd train` / `extkd distill` workdir, callable on raw uint8 NHWC images
    (see extkd_jax.train.evaluate.TrainedModel)."""
    from extkd_jax.train.evaluate import load as _load

    return _load(workdir, dtype)
