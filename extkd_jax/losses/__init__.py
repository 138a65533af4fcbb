"""Distillation losses as pure functions of ``jax.numpy`` arrays and pytrees, shaped like optax's losses.

Contract (see docs/losses.md, which lists the keyword arguments of every loss):

* no flax import: this module needs only jax, chex and numpy;
* dtype: inputs are cast to float32 first and results are float32, whatever the input dtype (bf16, f16, and f64
  under ``jax_enable_x64`` alike); optax returns the input dtype, but a reduction over a batch in bf16 keeps 8 bits
  of mantissa, so the losses keep float32 for stability: cast the result if you need another dtype;
* teacher-side inputs go through ``jax.lax.stop_gradient``: no gradient ever flows into the teacher;
* values and gradients stay finite for logits of magnitude up to 1e4 (``log_softmax`` / ``logsumexp`` only);
* any leading batch shape: logits are ``(*batch, C)`` (the logit losses take ``axis=`` for another class axis);
  feature maps ``(*batch, ...)``; segments a list, a dict or any nested pytree of arrays, paired by path;
* per-example losses take ``where`` (a boolean mask of the batch shape: False entries count for nothing),
  ``weights`` (non-negative, batch shape) and ``reduction``: ``"mean"`` (default, ``sum(w * l) / sum(w)`` with
  ``w = weights * where``; 0 when ``sum(w) == 0``), ``"sum"`` (``sum(w * l)``) or ``"none"`` (``w * l``, batch
  shape). For a padded batch split over devices, ``sum_and_count`` gives the two numbers to ``psum``;
* batch-relational losses (pkt, rkd, rkd_distance, rkd_angle, similarity_preserving, correlation_congruence,
  dist, mlkd) compare examples with each other and return one scalar for the batch: they take ``where`` only
  (a masked-out example leaves every pair it is in), since no term belongs to one example for a weight to scale
  or a ``"none"`` reduction to return;
* shapes are checked at trace time (so also under ``jit``); a bad shape raises ``ValueError`` naming the
  function, the argument and the shapes seen. Value checks (temperature > 0, weights >= 0) apply to concrete
  values; traced values are not checked.
"""

from extkd_jax.losses._core import REDUCTIONS, reduce_loss, sum_and_count
from extkd_jax.losses.contrastive import contrast_scores, crd_nce, momentum_update, sample_negatives, unit_rows
from extkd_jax.losses.features import attention_transfer, extended_kd_loss, segment_mse
from extkd_jax.losses.logits import cross_entropy, dkd, kd_kl
from extkd_jax.losses.relations import (
    channel_distillation,
    feature_kl,
    mixture_kd,
    rkd_angle,
    rkd_distance,
    smoothness,
    triplet_margin,
)
from extkd_jax.losses.zoo import (
    correlation_congruence,
    dist,
    logit_standardized_kd,
    mlkd,
    nst,
    pkt,
    rkd,
    similarity_preserving,
)
from extkd_jax.losses.zoo_features import (
    activation_boundary,
    factor,
    factor_transfer,
    fsp,
    fsp_matrix,
    hierarchical_context,
    kdsvd,
    ofd,
    ofd_margin,
    top_right_singular_vectors,
    vid,
    vid_log_scale,
    vid_variance,
)

__all__ = [
    "REDUCTIONS",
    "contrast_scores",
    "crd_nce",
    "momentum_update",
    "sample_negatives",
    "unit_rows",
    "attention_transfer",
    "channel_distillation",
    "feature_kl",
    "mixture_kd",
    "rkd_angle",
    "rkd_distance",
    "smoothness",
    "triplet_margin",
    "correlation_congruence",
    "dist",
    "logit_standardized_kd",
    "mlkd",
    "activation_boundary",
    "factor",
    "factor_transfer",
    "hierarchical_context",
    "kdsvd",
    "top_right_singular_vectors",
    "ofd",
    "ofd_margin",
    "fsp",
    "fsp_matrix",
    "vid",
    "vid_log_scale",
    "vid_variance",
    "nst",
    "pkt",
    "rkd",
    "similarity_preserving",
    "cross_entropy",
    "dkd",
    "extended_kd_loss",
    "kd_kl",
    "reduce_loss",
    "segment_mse",
    "sum_and_count",
]
