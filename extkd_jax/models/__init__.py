"""Flax NNX models that sow their segment outputs, the model registry, and the student->teacher Connector."""

from extkd_jax.models.bn_fold import fold_batchnorm
from extkd_jax.models.connector import Connector
from extkd_jax.models.forward import count_params, forward_with_segments
from extkd_jax.models.registry import MODEL_NAMES, create_model

__all__ = ["MODEL_NAMES", "Connector", "count_params", "create_model", "fold_batchnorm", "forward_with_segments"]
