"""Losses on logits: cross-entropy (integer labels or soft targets), Hinton's KD, decoupled KD.

Each takes ``axis`` (the class axis, default -1: logits (N, C, H, W) with ``axis=1`` give a batch shape (N, H, W))
and ``where`` / ``weights`` / ``reduction`` on the per-example values. Inputs are cast to float32 and the result is
float32 whatever the input dtype (optax returns the input dtype; a bf16 batch mean would keep 8 bits of mantissa).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from extkd_jax.losses._core import (
    Array,
    _check_labels,
    _check_logit_pair,
    _check_min_rank,
    _check_nonnegative,
    _check_positive,
    _class_last,
    _concrete_scalar,
    _f32,
    _kl_from_logp,
    _masked,
    _reduce,
)


def kd_kl(
    student_logits: Array,
    teacher_logits: Array,
    temperature: float | Array = 4.0,
    *,
    axis: int = -1,
    where: Array | None = None,
    weights: Array | None = None,
    reduction: str = "mean",
) -> Array:
    """Hinton et al. (2015): ``T^2 * KL(softmax(t/T) || softmax(s/T))`` per example, reduced.

    Args:
      student_logits, teacher_logits: (*batch, C); no gradient flows into the teacher.
      temperature: T > 0 softening both distributions; T^2 keeps gradient magnitudes comparable across T.
      axis: the class axis (default -1); the batch shape is every other axis, in order.
      where, weights, reduction: see the module docstring.
    """
    fn = "kd_kl"
    _check_positive(fn, "temperature", temperature)
    s, t = _check_logit_pair(fn, student_logits, teacher_logits, axis)
    s, t = _masked(fn, where, s, s.ndim - 1), _masked(fn, where, t, t.ndim - 1)
    temp = _f32(temperature)
    kl = (temp * temp) * _kl_from_logp(jax.nn.log_softmax(t / temp, -1), jax.nn.log_softmax(s / temp, -1))
    return _reduce(fn, kl, where, weights, reduction)


def cross_entropy(
    logits: Array,
    labels: Array,
    label_smoothing: float = 0.0,
    *,
    axis: int = -1,
    where: Array | None = None,
    weights: Array | None = None,
    reduction: str = "mean",
) -> Array:
    """Softmax cross-entropy against integer labels or soft targets.

    Args:
      logits: (*batch, C).
      labels: integers (*batch) in [0, C), or soft targets (*batch, C) of non-negative floats summing to 1
        (mixup's mixed labels, a teacher's probabilities).
      label_smoothing: eps in [0, 1); the target becomes ``(1 - eps) * target + eps / C`` (optax's convention).
      axis: the class axis of the logits (and of soft targets), default -1; integer labels have the logits' shape
        without it.
      where, weights, reduction: see the module docstring.
    """
    fn = "cross_entropy"
    ls = _concrete_scalar(label_smoothing)
    if ls is not None and not 0.0 <= ls < 1.0:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 1), got {label_smoothing!r}")
    x = _f32(logits)
    _check_min_rank(fn, "logits", x, 1)
    shape = tuple(x.shape)
    x = _class_last(fn, "logits", x, axis)
    x = _masked(fn, where, x, x.ndim - 1)
    log_p = jax.nn.log_softmax(x, axis=-1)
    labels = jnp.asarray(labels)
    if jnp.issubdtype(labels.dtype, jnp.floating):
        if tuple(labels.shape) != shape:
            raise ValueError(
                f"{fn}: labels of dtype {labels.dtype} are soft targets and need the logits' shape "
                f"{shape}, got {tuple(labels.shape)}; give integer class labels or one "
                "probability per class"
            )
        targets = jax.lax.stop_gradient(_class_last(fn, "labels", _f32(labels), axis))
        nll = -jnp.sum(targets * log_p, axis=-1)
    else:
        labels = _check_labels(fn, x, labels)
        nll = -jnp.take_along_axis(log_p, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if ls is None or ls != 0.0:
        eps = _f32(label_smoothing)
        nll = (1.0 - eps) * nll + eps * (-jnp.mean(log_p, axis=-1))
    return _reduce(fn, nll, where, weights, reduction)


def dkd(
    student_logits: Array,
    teacher_logits: Array,
    labels: Array,
    alpha: float | Array = 1.0,
    beta: float | Array = 8.0,
    temperature: float | Array = 4.0,
    *,
    axis: int = -1,
    where: Array | None = None,
    weights: Array | None = None,
    reduction: str = "mean",
) -> Array:
    """Decoupled knowledge distillation (Zhao et al., 2022): ``alpha * TCKD + beta * NCKD`` per example.

    Args:
      student_logits, teacher_logits: (*batch, C) with C >= 2; no gradient flows into the teacher.
      labels: (*batch) integer targets.
      alpha, beta: weights of TCKD and NCKD; temperature: T > 0.
      axis: the class axis (default -1); labels have the logits' shape without it.
      where, weights, reduction: see the module docstring.

    TCKD = T^2 * KL between the binary (target, non-target) distributions of teacher and student; NCKD = T^2 * KL
    between the distributions over the non-target classes (target excluded exactly, not by mdistiller's "- 1000"
    shift, so it stays correct for logits of any magnitude).
    """
    fn = "dkd"
    _check_positive(fn, "temperature", temperature)
    _check_nonnegative(fn, "alpha", alpha)
    _check_nonnegative(fn, "beta", beta)
    s, t = _check_logit_pair(fn, student_logits, teacher_logits, axis)
    s, t = _masked(fn, where, s, s.ndim - 1), _masked(fn, where, t, t.ndim - 1)
    if s.shape[-1] < 2:
        raise ValueError(f"{fn}: need at least 2 classes, got student_logits shape {tuple(s.shape)}")
    labels = _check_labels(fn, s, labels)
    temp = _f32(temperature)
    mask = jax.nn.one_hot(labels, s.shape[-1], dtype=jnp.bool_)  # True at the target

    def parts(z: Array) -> tuple[Array, Array]:
        """Binary log-probs (*batch, 2) and non-target log-probs (*batch, C) (target entry 0, finite)."""
        z = z / temp
        lse_all = jax.nn.logsumexp(z, axis=-1)
        # the target replaced by a finite value far below the row (exp underflows to exactly 0): no -inf, no NaN
        low = jax.lax.stop_gradient(jnp.min(z, axis=-1, keepdims=True)) - 1000.0
        z_nt = jnp.where(mask, low, z)
        lse_nt = jax.nn.logsumexp(z_nt, axis=-1)
        z_t = jnp.sum(jnp.where(mask, z, 0.0), axis=-1)
        log_bin = jnp.stack([z_t - lse_all, lse_nt - lse_all], axis=-1)
        return log_bin, jnp.where(mask, 0.0, z_nt - lse_nt[..., None])

    bin_s, nt_s = parts(s)
    bin_t, nt_t = parts(t)
    tckd = _kl_from_logp(bin_t, bin_s)
    nckd = jnp.sum(jnp.where(mask, 0.0, jnp.exp(nt_t) * (nt_t - nt_s)), axis=-1)  # masked entry: 0 * (0 - 0)
    per_example = (temp * temp) * (_f32(alpha) * tckd + _f32(beta) * nckd)
    return _reduce(fn, per_example, where, weights, reduction)
