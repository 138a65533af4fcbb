"""Distillation losses as pure functions of ``jax.numpy`` arrays and pytrees.

Contract (see docs/design.md):

* no flax import: this module needs only jax, chex and numpy;
* every loss casts its inputs to float32 first and returns a float32 scalar, whatever the input dtype
  (bf16 activations included);
* teacher-side inputs go through ``jax.lax.stop_gradient``, so a gradient never flows into the teacher;
* values and gradients stay finite for logits of magnitude up to 1e4: everything is computed from
  ``log_softmax`` / ``logsumexp`` (never ``log(softmax)``), masked entries are given finite values so that
  neither branch of a ``jnp.where`` produces NaN or inf;
* shapes are checked at trace time (so also under ``jit``) and a bad shape raises ``ValueError`` naming the
  function, the argument and the shapes seen. Value checks (temperature > 0, weights >= 0) apply when the value
  is concrete (a Python / NumPy number or a non-traced array); traced values are not checked.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["kd_kl", "segment_mse", "cross_entropy", "extended_kd_loss", "attention_transfer", "dkd"]

Array = jax.Array
Segments = Union[Sequence[Any], Mapping[Any, Any]]
SegmentWeights = Union[None, float, Array, Sequence[Any], Mapping[Any, Any]]


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def _f32(x: Any) -> Array:
    return jnp.asarray(x).astype(jnp.float32)


def _check_rank(fn: str, name: str, x: Array, rank: int) -> None:
    """chex rank check, re-raised as ValueError naming the function, the argument and its shape."""
    try:
        chex.assert_rank(x, rank)
    except AssertionError as err:
        raise ValueError(f"{fn}: {name} must have rank {rank}, got shape {tuple(x.shape)}") from err


def _check_same_shape(fn: str, name_a: str, a: Array, name_b: str, b: Array) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{fn}: {name_a} shape {tuple(a.shape)} != {name_b} shape {tuple(b.shape)}")


def _concrete_scalar(x: Any) -> float | None:
    """The value of ``x`` as a float when it is a concrete scalar, None when it is traced (or not a scalar)."""
    if isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return float(x)
    try:
        arr = np.asarray(x)
    except Exception:  # noqa: BLE001 - anything non-concrete: skip the value check
        return None
    if arr.ndim != 0 or not np.issubdtype(arr.dtype, np.number):
        return None
    return float(arr)


def _is_scalar(x: Any) -> bool:
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return True
    return hasattr(x, "shape") and hasattr(x, "dtype") and np.ndim(x) == 0


def _check_positive(fn: str, name: str, value: Any) -> None:
    v = _concrete_scalar(value)
    if v is not None and not v > 0:
        raise ValueError(f"{fn}: {name} must be > 0, got {value!r}")


def _check_nonnegative(fn: str, name: str, value: Any) -> None:
    v = _concrete_scalar(value)
    if v is not None and not v >= 0:
        raise ValueError(f"{fn}: {name} must be >= 0, got {value!r}")


def _check_labels(fn: str, logits: Array, labels: Any) -> Array:
    labels = jnp.asarray(labels)
    _check_rank(fn, "labels", labels, 1)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{fn}: labels must be integers, got dtype {labels.dtype}")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"{fn}: labels shape {tuple(labels.shape)} does not match the batch of logits shape {tuple(logits.shape)}"
        )
    if not isinstance(labels, jax.core.Tracer) and labels.size:
        lab = np.asarray(labels)
        if lab.min() < 0 or lab.max() >= logits.shape[-1]:
            raise ValueError(
                f"{fn}: labels must lie in [0, {logits.shape[-1]}), got range [{lab.min()}, {lab.max()}]"
            )
    return labels


def _check_logit_pair(fn: str, student_logits: Any, teacher_logits: Any) -> tuple[Array, Array]:
    s = _f32(student_logits)
    t = _f32(teacher_logits)
    _check_rank(fn, "student_logits", s, 2)
    _check_rank(fn, "teacher_logits", t, 2)
    _check_same_shape(fn, "student_logits", s, "teacher_logits", t)
    return s, jax.lax.stop_gradient(t)


def _kl_from_logp(log_p: Array, log_q: Array) -> Array:
    """Row-wise KL(p || q) from finite log-probabilities (last axis). ``exp(log_p)`` may underflow to 0, and
    then the term is 0 * finite = 0: no 0 * log 0 arises because log_p is never -inf here."""
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


# --------------------------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------------------------


def kd_kl(
    student_logits: Array,
    teacher_logits: Array,
    temperature: float | Array = 4.0,
    weights: Array | None = None,
) -> Array:
    """Hinton et al. (2015) distillation loss.

    Args:
      student_logits: (N, C).
      teacher_logits: (N, C); no gradient flows into them.
      temperature: T > 0 softening both distributions.
      weights: optional (N,) non-negative per-example weights.

    Returns:
      float32 scalar ``T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over the batch; with ``weights`` the
      weighted mean ``sum(w * kl) / sum(w)`` (0 when ``sum(w) == 0``). The T^2 factor keeps gradient magnitudes
      comparable across temperatures.
    """
    fn = "kd_kl"
    _check_positive(fn, "temperature", temperature)
    s, t = _check_logit_pair(fn, student_logits, teacher_logits)
    temp = _f32(temperature)
    log_ps = jax.nn.log_softmax(s / temp, axis=-1)
    log_pt = jax.nn.log_softmax(t / temp, axis=-1)
    kl = (temp * temp) * _kl_from_logp(log_pt, log_ps)  # (N,)
    if weights is None:
        return jnp.mean(kl)
    w = _f32(weights)
    _check_rank(fn, "weights", w, 1)
    if w.shape[0] != s.shape[0]:
        raise ValueError(f"{fn}: weights shape {tuple(w.shape)} does not match the batch of logits shape {tuple(s.shape)}")
    if not isinstance(weights, jax.core.Tracer) and np.any(np.asarray(w) < 0):
        raise ValueError(f"{fn}: weights must be >= 0, got min {float(np.min(np.asarray(w)))}")
    total_w = jnp.sum(w)
    safe = jnp.where(total_w == 0, 1.0, total_w)
    return jnp.where(total_w == 0, 0.0, jnp.sum(w * kl) / safe)


def cross_entropy(logits: Array, labels: Array, label_smoothing: float = 0.0) -> Array:
    """Softmax cross-entropy against integer labels.

    Args:
      logits: (N, C).
      labels: (N,) integers in [0, C).
      label_smoothing: eps in [0, 1); the target is ``(1 - eps) * one_hot + eps / C`` (optax's convention).

    Returns:
      float32 scalar, mean over the batch.
    """
    fn = "cross_entropy"
    ls = _concrete_scalar(label_smoothing)
    if ls is not None and not 0.0 <= ls < 1.0:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 1), got {label_smoothing!r}")
    x = _f32(logits)
    _check_rank(fn, "logits", x, 2)
    labels = _check_labels(fn, x, labels)
    log_p = jax.nn.log_softmax(x, axis=-1)
    nll = -jnp.take_along_axis(log_p, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    if ls is not None and ls == 0.0:
        return jnp.mean(nll)
    eps = _f32(label_smoothing)
    smooth = -jnp.mean(log_p, axis=-1)
    return jnp.mean((1.0 - eps) * nll + eps * smooth)


def _segment_items(fn: str, student: Segments, teacher: Segments) -> list[tuple[Any, Any, Any]]:
    """[(name, student_k, teacher_k)]: names are indices for sequences, keys (sorted) for mappings."""
    if isinstance(student, Mapping) or isinstance(teacher, Mapping):
        if not (isinstance(student, Mapping) and isinstance(teacher, Mapping)):
            raise ValueError(
                f"{fn}: student_segments is {type(student).__name__} but teacher_segments is "
                f"{type(teacher).__name__}; both must be sequences or both mappings"
            )
        if set(student) != set(teacher):
            only_s = "[" + ", ".join(sorted(map(repr, set(student) - set(teacher)))) + "]"
            only_t = "[" + ", ".join(sorted(map(repr, set(teacher) - set(student)))) + "]"
            raise ValueError(
                f"{fn}: segment keys differ: only in student_segments {only_s}, only in teacher_segments {only_t}"
            )
        if not student:
            raise ValueError(f"{fn}: no segments given (empty mappings)")
        keys = sorted(student)
        return [(k, student[k], teacher[k]) for k in keys]
    if isinstance(student, (str, bytes)) or not isinstance(student, Sequence):
        raise ValueError(f"{fn}: student_segments must be a sequence or a mapping, got {type(student).__name__}")
    if isinstance(teacher, (str, bytes)) or not isinstance(teacher, Sequence):
        raise ValueError(f"{fn}: teacher_segments must be a sequence or a mapping, got {type(teacher).__name__}")
    if len(student) != len(teacher):
        raise ValueError(
            f"{fn}: segment count differs: {len(student)} student segments vs {len(teacher)} teacher segments"
        )
    if len(student) == 0:
        raise ValueError(f"{fn}: no segments given (empty sequences)")
    return [(i, s, t) for i, (s, t) in enumerate(zip(student, teacher))]


def _segment_label(name: Any) -> str:
    return f"segment {name}" if isinstance(name, int) else f"segment {name!r}"


def _per_segment_weights(
    fn: str, weights: SegmentWeights, names: list[Any], segments_are_mapping: bool, arg: str = "weights"
) -> list[Any]:
    """One weight per segment (None -> 1). Concrete negative weights raise ValueError naming the segment."""
    k = len(names)
    if weights is None:
        return [1.0] * k
    if _is_scalar(weights):
        _check_nonnegative(fn, arg, weights)
        return [weights] * k
    if isinstance(weights, Mapping):
        if not segments_are_mapping:
            raise ValueError(f"{fn}: {arg} is a mapping but the segments are a sequence; give a sequence")
        if set(weights) != set(names):
            raise ValueError(
                f"{fn}: {arg} keys [{', '.join(sorted(map(repr, weights)))}] != segment keys "
                f"[{', '.join(map(repr, names))}]"
            )
        out = [weights[n] for n in names]
    else:
        if hasattr(weights, "shape") and np.ndim(weights) != 1:
            raise ValueError(f"{fn}: {arg} must be a scalar or one weight per segment, got shape {np.shape(weights)}")
        out = list(weights)
        if len(out) != k:
            raise ValueError(f"{fn}: {arg} has {len(out)} entries for {k} segments (order: {names})")
    for n, w in zip(names, out):
        if not _is_scalar(w):
            raise ValueError(f"{fn}: {arg} for {_segment_label(n)} must be a scalar, got {w!r}")
        v = _concrete_scalar(w)
        if v is not None and not v >= 0:
            raise ValueError(f"{fn}: {arg} for {_segment_label(n)} must be >= 0, got {w!r}")
    return out


def segment_mse(
    student_segments: Segments,
    teacher_segments: Segments,
    weights: SegmentWeights = None,
) -> Array:
    """Weighted sum over segments of the mean squared error between student and teacher segment outputs.

    Args:
      student_segments: a sequence of arrays, or a mapping name -> array. Each student segment must already
        have its teacher's shape (apply a Connector first when they differ).
      teacher_segments: same structure (same length, or same keys) and shapes; no gradient flows into them.
      weights: None (all 1), a scalar applied to every segment, or one non-negative weight per segment: a
        sequence in segment order, or for mapping segments a mapping with the same keys.

    Mapping segments are iterated in sorted key order (the order ``jax.tree_util`` uses, so it survives
    ``jit``); a weight sequence given with mapping segments follows that order.

    Returns:
      float32 scalar ``sum_k w_k * mean((s_k - t_k)^2)``, the mean running over all elements, batch included.
    """
    fn = "segment_mse"
    items = _segment_items(fn, student_segments, teacher_segments)
    names = [n for n, _, _ in items]
    ws = _per_segment_weights(fn, weights, names, isinstance(student_segments, Mapping))
    total = jnp.zeros((), jnp.float32)
    for (name, s, t), w in zip(items, ws):
        s = _f32(s)
        t = jax.lax.stop_gradient(_f32(t))
        if tuple(s.shape) != tuple(t.shape):
            raise ValueError(
                f"{fn}: {_segment_label(name)}: student shape {tuple(s.shape)} != teacher shape {tuple(t.shape)}"
            )
        total = total + _f32(w) * jnp.mean(jnp.square(s - t))
    return total


def extended_kd_loss(
    student_logits: Array,
    teacher_logits: Array,
    labels: Array | None,
    student_segments: Segments | None,
    teacher_segments: Segments | None,
    *,
    temperature: float | Array = 4.0,
    ce_weight: float | Array = 1.0,
    kd_weight: float | Array = 1.0,
    segment_weight: SegmentWeights = 1.0,
    label_smoothing: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
    """Extended distillation: cross-entropy + logit KD + segment matching.

    Args:
      student_logits, teacher_logits: (N, C); no gradient flows into the teacher.
      labels: (N,) integers, or None to drop the CE term (e.g. transfer sets without usable labels).
      student_segments, teacher_segments: as in :func:`segment_mse`; both None drops the segment term.
      temperature: KD temperature (> 0).
      ce_weight, kd_weight: non-negative scalars.
      segment_weight: a non-negative scalar, or one weight per segment (sequence / mapping, as in segment_mse).
      label_smoothing: passed to :func:`cross_entropy`.

    Returns:
      ``(total, parts)`` with float32 scalars::

        parts["ce"]      = cross_entropy(student_logits, labels)        (0.0 when labels is None)
        parts["kd"]      = kd_kl(student_logits, teacher_logits, T)
        parts["segment"] = segment_mse(s, t)                  if segment_weight is a scalar
                         = segment_mse(s, t, segment_weight)  if segment_weight is per-segment
                           (0.0 when both segment arguments are None)
        total = ce_weight * parts["ce"] + kd_weight * parts["kd"]
                + (segment_weight if scalar else 1) * parts["segment"]

      i.e. ``ce`` and ``kd`` are unweighted; ``segment`` carries only the per-segment weights.
    """
    fn = "extended_kd_loss"
    _check_nonnegative(fn, "ce_weight", ce_weight)
    _check_nonnegative(fn, "kd_weight", kd_weight)
    _check_positive(fn, "temperature", temperature)
    kd = kd_kl(student_logits, teacher_logits, temperature)
    if labels is None:
        ce = jnp.zeros((), jnp.float32)
    else:
        ce = cross_entropy(student_logits, labels, label_smoothing)
    total = _f32(kd_weight) * kd
    if labels is not None:
        total = total + _f32(ce_weight) * ce

    if (student_segments is None) != (teacher_segments is None):
        raise ValueError(f"{fn}: student_segments and teacher_segments must both be given or both be None")
    scalar_seg_weight = segment_weight is None or _is_scalar(segment_weight)
    if scalar_seg_weight and segment_weight is not None:
        _check_nonnegative(fn, "segment_weight", segment_weight)
    if student_segments is None:
        seg = jnp.zeros((), jnp.float32)
    elif scalar_seg_weight:
        seg = segment_mse(student_segments, teacher_segments)
        total = total + _f32(1.0 if segment_weight is None else segment_weight) * seg
    else:
        items = _segment_items(fn, student_segments, teacher_segments)
        names = [n for n, _, _ in items]
        _per_segment_weights(fn, segment_weight, names, isinstance(student_segments, Mapping), arg="segment_weight")
        seg = segment_mse(student_segments, teacher_segments, segment_weight)
        total = total + seg
    return total, {"ce": ce, "kd": kd, "segment": seg}


def _attention_map(f: Array, p: Any, p_is_two: bool) -> Array:
    """(N, H, W, C) -> (N, H*W): channel mean of |f|^p, each row L2-normalised (norm clamped at 1e-12, as
    torch's F.normalize, with a gradient-safe sqrt)."""
    a = jnp.square(f) if p_is_two else jnp.abs(f) ** _f32(p)
    a = jnp.mean(a, axis=-1).reshape(f.shape[0], -1)
    sq = jnp.sum(jnp.square(a), axis=-1, keepdims=True)
    norm = jnp.sqrt(jnp.maximum(sq, 1e-24))
    return a / norm


def attention_transfer(
    student_feats: Array | Sequence[Array],
    teacher_feats: Array | Sequence[Array],
    p: float = 2,
) -> Array:
    """Attention transfer (Zagoruyko & Komodakis, 2017), in RepDistiller's form.

    Args:
      student_feats: one NHWC feature map or a sequence of them.
      teacher_feats: same count; each pair must share N, H and W (channels may differ). No teacher gradient.
      p: exponent (> 0) in the attention map ``mean_c |f|^p``.

    Returns:
      float32 scalar ``sum over pairs of mean((a_s - a_t)^2)`` where ``a`` is the attention map flattened per
      example and L2-normalised, the mean running over batch and positions.
    """
    fn = "attention_transfer"
    _check_positive(fn, "p", p)
    pv = _concrete_scalar(p)
    p_is_two = pv is not None and pv == 2.0
    single_s = hasattr(student_feats, "shape")
    single_t = hasattr(teacher_feats, "shape")
    if single_s != single_t:
        raise ValueError(f"{fn}: student_feats and teacher_feats must both be arrays or both be sequences")
    s_list = [student_feats] if single_s else list(student_feats)
    t_list = [teacher_feats] if single_t else list(teacher_feats)
    if len(s_list) != len(t_list):
        raise ValueError(f"{fn}: {len(s_list)} student feature maps vs {len(t_list)} teacher feature maps")
    if not s_list:
        raise ValueError(f"{fn}: no feature maps given (empty sequences)")
    total = jnp.zeros((), jnp.float32)
    for i, (s, t) in enumerate(zip(s_list, t_list)):
        s = _f32(s)
        t = jax.lax.stop_gradient(_f32(t))
        _check_rank(fn, f"student_feats[{i}]", s, 4)
        _check_rank(fn, f"teacher_feats[{i}]", t, 4)
        if tuple(s.shape[:3]) != tuple(t.shape[:3]):
            raise ValueError(
                f"{fn}: pair {i}: student shape {tuple(s.shape)} and teacher shape {tuple(t.shape)} differ in "
                "batch or spatial size (N, H, W must match; channels may differ)"
            )
        diff = _attention_map(s, p, p_is_two) - _attention_map(t, p, p_is_two)
        total = total + jnp.mean(jnp.square(diff))
    return total


def dkd(
    student_logits: Array,
    teacher_logits: Array,
    labels: Array,
    alpha: float | Array = 1.0,
    beta: float | Array = 8.0,
    temperature: float | Array = 4.0,
) -> Array:
    """Decoupled knowledge distillation (Zhao et al., 2022).

    Args:
      student_logits, teacher_logits: (N, C) with C >= 2; no gradient flows into the teacher.
      labels: (N,) integer targets.
      alpha, beta: weights of TCKD and NCKD.
      temperature: T > 0.

    Returns:
      float32 scalar, batch mean of ``alpha * TCKD + beta * NCKD`` where
      TCKD = T^2 * KL between the binary (target, non-target) distributions of teacher and student, and
      NCKD = T^2 * KL between the distributions over the non-target classes only (target excluded exactly,
      not by mdistiller's "- 1000" shift, so it stays correct for logits of any magnitude).
    """
    fn = "dkd"
    _check_positive(fn, "temperature", temperature)
    _check_nonnegative(fn, "alpha", alpha)
    _check_nonnegative(fn, "beta", beta)
    s, t = _check_logit_pair(fn, student_logits, teacher_logits)
    if s.shape[1] < 2:
        raise ValueError(f"{fn}: need at least 2 classes, got student_logits shape {tuple(s.shape)}")
    labels = _check_labels(fn, s, labels)
    temp = _f32(temperature)
    mask = jax.nn.one_hot(labels, s.shape[1], dtype=jnp.bool_)  # (N, C), True at the target

    def parts(z: Array) -> tuple[Array, Array]:
        """Binary log-probs (N, 2) and non-target log-probs (N, C) (target entry set to 0, finite)."""
        z = z / temp
        lse_all = jax.nn.logsumexp(z, axis=-1)
        # Replace the target by a finite value far below the row (exp underflows to exactly 0): no -inf, so no
        # NaN in values or gradients; the target entry is then masked out of every sum below.
        low = jax.lax.stop_gradient(jnp.min(z, axis=-1, keepdims=True)) - 1000.0
        z_nt = jnp.where(mask, low, z)
        lse_nt = jax.nn.logsumexp(z_nt, axis=-1)
        z_t = jnp.sum(jnp.where(mask, z, 0.0), axis=-1)
        log_bin = jnp.stack([z_t - lse_all, lse_nt - lse_all], axis=-1)
        log_nt = jnp.where(mask, 0.0, z_nt - lse_nt[:, None])
        return log_bin, log_nt

    bin_s, nt_s = parts(s)
    bin_t, nt_t = parts(t)
    tckd = _kl_from_logp(bin_t, bin_s)
    # For the masked target entry both log-probs are 0, so the term is exp(0) * (0 - 0) = 0.
    nckd = jnp.sum(jnp.where(mask, 0.0, jnp.exp(nt_t) * (nt_t - nt_s)), axis=-1)
    per_example = (temp * temp) * (_f32(alpha) * tckd + _f32(beta) * nckd)
    return jnp.mean(per_example)
