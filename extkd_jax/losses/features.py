"""Losses on intermediate features: segment MSE, Extended-KD (logits + segments), attention transfer.

Each takes ``where`` / ``weights`` / ``reduction`` on the per-example values, and extended_kd_loss the class ``axis``
of its logits. Segments are lists, dicts or nested pytrees of arrays (``extkd_jax.losses.segments``). Inputs are
cast to float32 and the result is float32 whatever the input dtype (bf16 included).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

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
from extkd_jax.losses.segments import Segment, segment_pairs, segment_weight_list


def _segment_terms(fn: str, segments: list[Segment], where: Any, batch_ndim: int) -> list[Array]:
    """Per segment, the per-example MSE (batch shape) over the segment's non-batch elements."""
    out = []
    for seg in segments:
        s, t = _f32(seg.student), jax.lax.stop_gradient(_f32(seg.teacher))
        _check_same_shape(fn, f"{seg.label}: student", s, "teacher", t)
        _check_min_rank(fn, seg.label, s, batch_ndim)
        s, t = _masked(fn, where, s, batch_ndim), _masked(fn, where, t, batch_ndim)
        out.append(jnp.mean(jnp.square(s - t), axis=tuple(range(batch_ndim, s.ndim))))
    return out


def _weighted_sum(terms: list[Array], ws: list[Any]) -> Array:
    total = _f32(ws[0]) * terms[0]
    for term, w in zip(terms[1:], ws[1:]):
        total = total + _f32(w) * term
    return total


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
      student_segments: a list, a dict or any nested pytree of arrays (Linen's ``mutable=["intermediates"]``
        output as it comes), paired with the teacher's by path (``extkd_jax.losses.segments``). Each must already
        have its teacher's shape (map it through a Connector first when they differ).
      teacher_segments: the same paths and shapes; no gradient flows into them.
      segment_weights: None (all 1), a scalar, a sequence (one weight per top-level entry, or per segment in
        flattened order), or a pytree / mapping of scalars matched by path prefix (``{"block1": 2.0}`` or
        ``{"intermediates/block1/seg/0": 2.0}``). Dicts flatten in sorted key order.
      batch_ndim: how many leading axes are batch axes (the rest are averaged within each example).
      where, weights, reduction: per-example mask, weights and reduction (module docstring). No ``axis``.

    Per example: ``sum_k w_k * mean((s_k - t_k)^2)`` over the segment's non-batch elements. Its batch mean
    equals the mean over all elements, batch included.
    """
    fn = "segment_mse"
    segments = segment_pairs(fn, student_segments, teacher_segments)
    ws = segment_weight_list(fn, segment_weights, segments, student_segments, "segment_weights")
    return _reduce(fn, _weighted_sum(_segment_terms(fn, segments, where, batch_ndim), ws), where, weights, reduction)


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
    axis: int = -1,
    where: Array | None = None,
    weights: Array | None = None,
    reduction: str = "mean",
) -> tuple[Array, dict[str, Array]]:
    """Extended-KD (Yuan & Pan 2019): cross-entropy + logit KD + segment matching.

    Args:
      student_logits, teacher_logits: (*batch, C) (the class axis at ``axis``); no gradient flows into the teacher.
      labels: integer labels or soft targets (see :func:`cross_entropy`), or None to drop the CE term.
      student_segments, teacher_segments: as in :func:`segment_mse` (lists, dicts, nested pytrees such as Linen's
        intermediates), each (*batch, ...); both None drops the segment term.
      temperature: KD temperature (> 0).
      ce_weight, kd_weight: non-negative scalars.
      segment_weight: a non-negative scalar, or per-segment weights in any form ``segment_mse`` takes.
      label_smoothing: passed to :func:`cross_entropy`.
      axis: the class axis of the logits (default -1).
      where, weights, reduction: applied to every part and to the total alike.

    Returns:
      ``(total, parts)``, every part unweighted: ``parts["ce"]`` (0 when labels is None), ``parts["kd"]`` and
      ``parts["segment"] = sum_k mse_k`` (0 without segments), whatever form the segment weights take;
      ``total = ce_weight * ce + kd_weight * kd + sum_k w_k * mse_k`` (``= w * segment`` for equal weights).
    """
    fn = "extended_kd_loss"
    _check_nonnegative(fn, "ce_weight", ce_weight)
    _check_nonnegative(fn, "kd_weight", kd_weight)
    _check_positive(fn, "temperature", temperature)
    if (student_segments is None) != (teacher_segments is None):
        raise ValueError(f"{fn}: student_segments and teacher_segments must both be given or both be None")
    reduce = {"where": where, "weights": weights, "reduction": reduction}
    kd = kd_kl(student_logits, teacher_logits, temperature, axis=axis, **reduce)
    zeros = jnp.zeros_like(kd)
    ce = zeros if labels is None else cross_entropy(student_logits, labels, label_smoothing, axis=axis, **reduce)
    total = _f32(kd_weight) * kd + (zeros if labels is None else _f32(ce_weight) * ce)
    if student_segments is None:
        if segment_weight is not None and _is_scalar(segment_weight):
            _check_nonnegative(fn, "segment_weight", segment_weight)
        return total, {"ce": ce, "kd": kd, "segment": zeros}
    segments = segment_pairs(fn, student_segments, teacher_segments)
    ws = segment_weight_list(fn, segment_weight, segments, student_segments, "segment_weight")
    batch_ndim = jnp.ndim(student_logits) - 1
    # each segment reduced on its own: the reduction is linear, and the parts then need no second pass
    per_example = _segment_terms(fn, segments, where, batch_ndim)
    terms = [_reduce(fn, term, where, weights, reduction) for term in per_example]
    segment = terms[0]
    for term in terms[1:]:
        segment = segment + term
    return total + _weighted_sum(terms, ws), {"ce": ce, "kd": kd, "segment": segment}


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

    Deviation, declared: RepDistiller and the authors' code raise the signed map, ``f.pow(p)``; ours raises
    ``|f|``. The two agree for p = 2 (the default), for every even p and on non-negative maps (post-ReLU
    segments); for odd or fractional p on signed maps theirs changes sign or is NaN, ours is defined.
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
