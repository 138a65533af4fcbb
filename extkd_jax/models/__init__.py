"""Flax NNX models that sow their segment outputs, the model registry, and the student->teacher Connector.

Reading segments: `forward_with_segments(model, x, train=False) -> (logits, [segments])`. The built-in models sow
only in a view, `nnx.view(model, sow_segments=True)`, so that a plain call never adds `nnx.Intermediate` state to
the model; a plain `nnx.capture(model, nnx.Intermediate)(x)` therefore captures nothing. `forward_with_segments` is
that view under `nnx.capture` (and sets train / eval mode); a model of one's own may sow always.
"""

from extkd_jax.models.bn_fold import fold_batchnorm
from extkd_jax.models.connector import Connector
from extkd_jax.models.forward import forward_with_segments
from extkd_jax.models.registry import create_model, ensure_model, model_imports, model_names, register_model

__all__ = [
    "Connector",
    "create_model",
    "ensure_model",
    "fold_batchnorm",
    "forward_with_segments",
    "model_imports",
    "model_names",
    "register_model",
]
