"""extkd_jax: knowledge distillation of image classifiers in JAX / Flax NNX.

Importing the package imports nothing heavy: `from extkd_jax.losses import kd_kl` needs only jax and chex.
"""

__version__ = "0.1.0"
