"""CRD (Tian et al. 2020) as RepDistiller runs it, on top of KD.

CRD's student-side state (Tian et al. 2020): the two embedding heads the optimizer trains, the momentum memory
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

from extkd_jax import losses
from extkd_jax.methods.base import Build, Method
from extkd_jax.methods.context import Context, pooled
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


def _crd(ctx: Context):
    """CRD (Tian et al. 2020) as RepDistiller runs it, on top of KD: both penultimate features embedded (linear heads,
    unit rows); the student's against the teacher's memory bank and the teacher's against the student's, each row
    scored with its own example (positive) and `loss.crd.negatives` examples of other classes, exp(score / T)
    divided by a constant fixed on the first step (mean score x set size), NCE loss; then both banks move their
    batch rows towards the new embeddings (momentum). Needs the batch's positions in the transfer set."""
    c = ctx.loss.crd
    if ctx.indices is None:
        raise ValueError(
            "loss.name='crd' needs each batch's positions in the transfer set, which only data.pipeline='device' "
            "with replicated placement provides"
        )
    logits, segments = ctx.student()
    teacher_logits, teacher_segments = ctx.teacher()
    kd_total, kd_parts = ctx.base(logits, teacher_logits)
    head = ctx.module.projector
    v_s = losses.unit_rows(head.embed_student(pooled(segments[-1])))
    v_t = losses.unit_rows(head.embed_teacher(pooled(teacher_segments[-1])))
    negatives = losses.sample_negatives(
        ctx.key, ctx.labels, head.order[...], head.class_start[...], head.class_count[...], c.negatives
    )
    contrast = jnp.concatenate([ctx.indices[:, None].astype(negatives.dtype), negatives], axis=1)
    n = head.num_data
    scores_s = losses.contrast_scores(v_s, head.memory_teacher[...], contrast, c.temperature)
    scores_t = losses.contrast_scores(v_t, head.memory_student[...], contrast, c.temperature)
    first = jax.lax.stop_gradient(jnp.stack([jnp.mean(scores_s), jnp.mean(scores_t)]) * n)
    z = jnp.where(head.normalisers[...] < 0, first, head.normalisers[...])
    contrast_loss = losses.crd_nce(scores_s / z[0], n) + losses.crd_nce(scores_t / z[1], n)
    head.normalisers[...] = z
    head.memory_student[...] = losses.momentum_update(head.memory_student[...], ctx.indices, v_s, c.momentum)
    head.memory_teacher[...] = losses.momentum_update(head.memory_teacher[...], ctx.indices, v_t, c.momentum)
    return kd_total + c.weight * contrast_loss, {**kd_parts, "contrast": contrast_loss}, logits


def _memory(b: Build) -> dict:
    if b.train_labels is None:
        raise ValueError(
            "loss.name='crd' needs the transfer set's labels (one memory row per example): only the device "
            "pipeline (data.pipeline='device') provides them"
        )
    student_dim, teacher_dim = b.student_shapes[-1][-1], b.teacher_shapes[-1][-1]
    memory = ContrastMemory(student_dim, teacher_dim, b.train_labels, b.knobs.dim, rngs=b.rngs, dtype=b.dtype)
    return {"projector": memory}


CRD = Method(
    "crd",
    "CRD (Tian et al. 2020): KD + NCE of embeddings against the other network's memory bank",
    family="zoo",
    objective=_crd,
    # KD + weight x the NCE loss of both embeddings against the other network's memory bank (on the penultimate
    # features); RepDistiller's defaults: -b 0.8, 16384 negatives, 128-d, nce_t 0.07, momentum 0.5
    knobs={"weight": 0.8, "negatives": 16384, "dim": 128, "temperature": 0.07, "momentum": 0.5},
    kinds={"weight": "weight", "negatives": "count", "dim": "count", "temperature": "positive", "momentum": "fraction"},
    tune="weight",
    grid=(0.08, 0.8),
    needs=frozenset({"teacher", "positions", "sampling"}),
    modules=_memory,
    zoo=True,
)
