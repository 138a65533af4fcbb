"""Losses on intermediate features: segment MSE, Extended-KD (logits + segments), attention transfer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from extkd_jax.losses._core import (
    Array,
    Segments,
    SegmentWeights,
    _check_min_rank,
    _check_nonnegative,
    _check_positive,
    _check_same_shape,
    _concrete_scalar,
    _f32,
    _is_scalar,
    _masked,
    _reduce,
)
from extkd_jax.losses.logits import cross_entropy, kd_kl


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
        return [(k, student[k], teacher[k]) for k in sorted(student)]
    for name, value in (("student_segments", student), ("teacher_segments", teacher)):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ValueError(f"{fn}: {name} must be a sequence or a mapping, got {type(value).__name__}")
    if len(student) != len(teacher):
        raise ValueError(
            f"{fn}: segment count differs: {len(student)} student segments vs {len(teacher)} teacher segments"
        )
    if len(student) == 0:
        raise ValueError(f"{fn}: no segments given (empty sequences)")
    return [(i, s, t) for i, (s, t) in enumerate(zip(student, teacher))]


def _segment_label(name: Any) -> str:
    return f"segment {name}" if isinstance(name, int) else f"segment {name!r}"


def _per_segment_weights(fn: str, weights: SegmentWeights, names: list[Any], mapping: bool, arg: str) -> list[Any]:
    """One weight per segment (None -> 1). Concrete negative weights raise ValueError naming the segment."""
    if weights is None:
        return [1.0] * len(names)
    if _is_scalar(weights):
        _check_nonnegative(fn, arg, weights)
        return [weights] * len(names)
    if isinstance(weights, Mapping):
        if not mapping:
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
        if len(out) != len(names):
            raise ValueError(f"{fn}: {arg} has {len(out)} entries for {len(names)} segments (order: {names})")
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
    segment_weights: SegmentWeights = None,
    *,
    batch_ndim: int = 1,
    where: Array | None = None,
    weights: Array | None = None,
    reduction: str = "mean",
) -> Array:
    """Weighted sum over segments of the mean squared error between student and teacher segment outputs.

    Args:
      student_segments: a sequence of arrays, or a mapping name -> array. Each must already have its teacher's
        shape (map it through a Connector first when they differ).
      teacher_segments: same structure and shapes; no gradient flows into them.
      segment_weights: None (all 1), a scalar, or one non-negative weight per segment (a sequence in segment
        order; for mapping segments, a mapping with the same keys). Mappings iterate in sorted key order.
      batch_ndim: how many leading axes are batch axes (the rest are averaged within each example).
      where, weights, reduction: per-example mask, weights and reduction (module docstring).

    Per example: ``sum_k w_k * mean((s_k - t_k)^2)`` over the segment's non-batch elements. Its batch mean
    equals the mean over all elements, batch included.
    """
    fn = "segment_mse"
    items = _segment_items(fn, student_segments, teacher_segments)
    names = [n for n, _, _ in items]
    ws = _per_segment_weights(fn, segment_weights, names, isinstance(student_segments, Mapping), "segment_weights")
    total = None
    for (name, s, t), w in zip(items, ws):
        s, t = _f32(s), jax.lax.stop_gradient(_f32(t))
        _check_same_shape(fn, f"{_segment_label(name)}: student", s, "teacher", t)
        _check_min_rank(fn, f"{_segment_label(name)}", s, batch_ndim)
        s, t = _masked(fn, where, s, batch_ndim), _masked(fn, where, t, batch_ndim)
        per_example = jnp.mean(jnp.square(s - t), axis=tuple(range(batch_ndim, s.ndim)))
        total = _f32(w) * per_example if total is None else total + _f32(w) * per_example
    return _reduce(fn, total, where, weights, reduction)


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
    where: Array | None = None,
    weights: Array | None = None,
    reduction: str = "mean",
) -> tuple[Array, dict[str, Array]]:
    """Extended-KD (Yuan & Pan 2019): cross-entropy + logit KD + segment matching.

    Args:
      student_logits, teacher_logits: (*batch, C); no gradient flows into the teacher.
      labels: integer labels or soft targets (see :func:`cross_entropy`), or None to drop the CE term.
      student_segments, teacher_segments: as in :func:`segment_mse`, each (*batch, ...); both None drops the
        segment term.
      temperature: KD temperature (> 0).
      ce_weight, kd_weight: non-negative scalars.
      segment_weight: a non-negative scalar, or one weight per segment (as ``segment_weights`` of segment_mse).
      label_smoothing: passed to :func:`cross_entropy`.
      where, weights, reduction: applied to every part and to the total alike.

    Returns:
      ``(total, parts)``: ``parts["ce"]`` and ``parts["kd"]`` unweighted (``ce`` 0 when labels is None),
      ``parts["segment"]`` with only the per-segment weights (0 without segments);
      ``total = ce_weight * ce + kd_weight * kd + (segment_weight if scalar else 1) * segment``.
    """
    fn = "extended_kd_loss"
    _check_nonnegative(fn, "ce_weight", ce_weight)
    _check_nonnegative(fn, "kd_weight", kd_weight)
    _check_positive(fn, "temperature", temperature)
    if (student_segments is None) != (teacher_segments is None):
        raise ValueError(f"{fn}: student_segments and teacher_segments must both be given or both be None")
    reduce = {"where": where, "weights": weights, "reduction": reduction}
    kd = kd_kl(student_logits, teacher_logits, temperature, **reduce)
    zeros = jnp.zeros_like(kd)
    ce = zeros if labels is None else cross_entropy(student_logits, labels, label_smoothing, **reduce)
    total = _f32(kd_weight) * kd + (zeros if labels is None else _f32(ce_weight) * ce)
    scalar_weight = segment_weight is None or _is_scalar(segment_weight)
    if scalar_weight and segment_weight is not None:
        _check_nonnegative(fn, "segment_weight", segment_weight)
    if student_segments is None:
        return total, {"ce": ce, "kd": kd, "segment": zeros}
    batch_ndim = jnp.ndim(student_logits) - 1
    if scalar_weight:
        seg = segment_mse(student_segments, teacher_segments, batch_ndim=batch_ndim, **reduce)
        total = total + _f32(1.0 if segment_weight is None else segment_weight) * seg
    else:
        items = _segment_items(fn, student_segments, teacher_segments)
        _per_segment_weights(
            fn, segment_weight, [n for n, _, _ in items], isinstance(student_segments, Mapping), "segment_weight"
        )
        seg = segment_mse(student_segments, teacher_segments, segment_weight, batch_ndim=batch_ndim, **reduce)
        total = total + seg
    return total, {"ce": ce, "kd": kd, "segment": seg}


def _attention_map(f: Array, p: Any, p_is_two: bool) -> Array:
    """(*batch, H, W, C) -> (*batch, H*W): channel mean of |f|^p, each row L2-normalised (norm clamped at 1e-12,
    as torch's F.normalize, with a gradient-safe sqrt)."""
    a = jnp.square(f) if p_is_two else jnp.abs(f) ** _f32(p)
    a = jnp.mean(a, axis=-1).reshape(f.shape[:-3] + (-1,))
    norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(a), axis=-1, keepdims=True), 1e-24))
    return a / norm


def attention_transfer(
    student_feats: Array | Sequence[Array],
    teacher_feats: Array | Sequence[Array],
    p: float = 2,
    *,
    where: Array | None = None,
    weights: Array | None = None,
    reduction: str = "mean",
) -> Array:
    """Attention transfer (Zagoruyko & Komodakis, 2017), in RepDistiller's form.

    Args:
      student_feats: one feature map (*batch, H, W, C) or a sequence of them.
      teacher_feats: same count; each pair shares batch, H and W (channels may differ). No teacher gradient.
      p: exponent (> 0) in the attention map ``mean_c |f|^p``.
      where, weights, reduction: see the module docstring.

    Per example: ``sum over pairs of mean over positions of (a_s - a_t)^2``, ``a`` the L2-normalised map.
    """
    fn = "attention_transfer"
    _check_positive(fn, "p", p)
    pv = _concrete_scalar(p)
    p_is_two = pv is not None and pv == 2.0
    if hasattr(student_feats, "shape") != hasattr(teacher_feats, "shape"):
        raise ValueError(f"{fn}: student_feats and teacher_feats must both be arrays or both be sequences")
    s_list = [student_feats] if hasattr(student_feats, "shape") else list(student_feats)
    t_list = [teacher_feats] if hasattr(teacher_feats, "shape") else list(teacher_feats)
    if len(s_list) != len(t_list):
        raise ValueError(f"{fn}: {len(s_list)} student feature maps vs {len(t_list)} teacher feature maps")
    if not s_list:
        raise ValueError(f"{fn}: no feature maps given (empty sequences)")
    total = None
    for i, (s, t) in enumerate(zip(s_list, t_list)):
        s, t = _f32(s), jax.lax.stop_gradient(_f32(t))
        _check_min_rank(fn, f"student_feats[{i}]", s, 4)
        _check_min_rank(fn, f"teacher_feats[{i}]", t, 4)
        if s.ndim != t.ndim or tuple(s.shape[:-1]) != tuple(t.shape[:-1]):
            raise ValueError(
                f"{fn}: pair {i}: student shape {tuple(s.shape)} and teacher shape {tuple(t.shape)} "
                "differ in batch or spatial size (all but the channel axis must match)"
            )
        s, t = _masked(fn, where, s, s.ndim - 3), _masked(fn, where, t, t.ndim - 3)
        diff = _attention_map(s, p, p_is_two) - _attention_map(t, p, p_is_two)
        per_example = jnp.mean(jnp.square(diff), axis=-1)
        total = per_example if total is None else total + per_example
    return _reduce(fn, total, where, weights, reduction)
