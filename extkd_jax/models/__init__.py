"""Flax NNX models that sow their segment outputs, the model registry, and the student->teacher Connector."""

from extkd_jax.models.bn_fold import fold_batchnorm
from extkd_jax.models.connector import Connector, Margins, VidRegressor
from extkd_jax.models.contrast import ContrastMemory
from extkd_jax.models.forward import forward_with_segments
from extkd_jax.models.registry import create_model, model_names, register_model

__all__ = [
    "Connector",
    "ContrastMemory",
    "Margins",
    "VidRegressor",
    "create_model",
    "fold_batchnorm",
    "forward_with_segments",
    "model_names",
    "register_model",
]
