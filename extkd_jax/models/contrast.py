"""CRD's student-side state (Tian et al. 2020): the two embedding heads the optimizer trains, the momentum memory
banks of both networks' embeddings (one row per transfer example), their normalisation constants, and the
transfer set's examples grouped by class (for drawing negatives of other classes).

Banks and constants are `Buffer`s (extkd_jax.models.common): the step writes them, the optimizer does not touch
them, and they are checkpointed with the student's statistics. The class grouping is a `Grouping` variable: rebuilt
from the labels at set-up, neither trained nor checkpointed.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from extkd_jax.models.common import Buffer, linear


class Grouping(nnx.Variable):
    """Constant integer arrays derived from the data set (not trained, not a statistic, not checkpointed)."""


class ContrastMemory(nnx.Module):
    """Embedding heads student_dim -> dim and teacher_dim -> dim, and banks of `len(labels)` unit rows each,
    initialised uniformly in +-1/sqrt(dim/3) as RepDistiller's `ContrastMemory` does."""

    def __init__(self, student_dim: int, teacher_dim: int, labels: np.ndarray, dim: int, *, rngs: nnx.Rngs, dtype: Any):
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0 or len(np.unique(labels)) < 2:
            raise ValueError(
                f"CRD needs the transfer set's labels with at least two classes (negatives come from other "
                f"classes); got {labels.size} labels of {len(np.unique(labels))} classes"
            )
        self.embed_student = linear(student_dim, dim, rngs=rngs, dtype=dtype)
        self.embed_teacher = linear(teacher_dim, dim, rngs=rngs, dtype=dtype)
        bound = 1.0 / math.sqrt(dim / 3.0)
        k_student, k_teacher = jax.random.split(rngs.params())
        n = labels.shape[0]
        self.memory_student = Buffer(jax.random.uniform(k_student, (n, dim), jnp.float32, -bound, bound))
        self.memory_teacher = Buffer(jax.random.uniform(k_teacher, (n, dim), jnp.float32, -bound, bound))
        self.normalisers = Buffer(jnp.full((2,), -1.0, jnp.float32))  # Z of both: set on the first step
        counts = np.bincount(labels, minlength=int(labels.max()) + 1)
        self.order = Grouping(jnp.asarray(np.argsort(labels, kind="stable"), jnp.int32))
        self.class_start = Grouping(jnp.asarray(np.concatenate([[0], np.cumsum(counts)[:-1]]), jnp.int32))
        self.class_count = Grouping(jnp.asarray(counts, jnp.int32))

    @property
    def num_data(self) -> int:
        return int(self.memory_student.shape[0])
