"""Losses between examples and on embeddings: relational KD (distances and angles), the triplet margin, the
distribution over a feature vector at a temperature, the loss-level mixture of KD targets, and smoothness.

Every function follows the package contract: inputs cast to float32 and a float32 result whatever the input dtype
(bf16 included), no teacher gradient, named shape errors. The per-example losses (triplet_margin, feature_kl,
mixture_kd, channel_distillation, smoothness) take ``where`` / ``weights`` / ``reduction``, and feature_kl and
mixture_kd the class ``axis``. The relational ones (rkd_distance, rkd_angle) compare examples within a batch of
(N, D) embeddings and return one scalar: they take ``where`` only (masked-out examples are left out of every pair).
Per-example ``weights`` have nothing to scale there (each term is a pair or a triplet of examples, and weighting
pairs by ``w_i w_j`` would be another loss than the paper's), and ``reduction="none"`` has no per-example values
to return.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from extkd_jax.losses._core import (
    Array,
    _check_min_rank,
    _check_nonnegative,
    _check_positive,
    _check_same_shape,
    _class_last,
    _f32,
    _kl_from_logp,
    _masked,
    _reduce,
)
from extkd_jax.losses.logits import kd_kl


def _pair_mask(fn: str, where: Any, n: int) -> Array:
    mask = jnp.ones((n,), bool) if where is None else jnp.asarray(where)
    if tuple(mask.shape) != (n,) or mask.dtype != jnp.bool_:
        raise ValueError(f"{fn}: where must be a boolean array of shape ({n},), got {mask.dtype} {tuple(mask.shape)}")
    return mask


def _centred_gram(e: Array, mask: Array) -> Array:
    """E E^T of the embeddings centred on the mean of the kept rows (masked rows zeroed): every relation below is a
    difference of embeddings, so centring changes none of them and keeps the Gram entries, and so the rounding of
    the differences taken from them, small. O(N^2) memory instead of the O(N^2 D) of explicit differences."""
    e = jnp.where(mask[:, None], e, 0.0)
    e = e - jnp.sum(e, axis=0) / jnp.maximum(jnp.sum(mask), 1)
    e = jnp.where(mask[:, None], e, 0.0)
    return e @ e.T


def _pairwise_sq_distances(gram: Array) -> Array:
    """|e_i - e_j|^2 from the Gram matrix, clamped at 0 against rounding."""
    sq = jnp.diagonal(gram)
    return jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)


def _pairwise_distances(gram: Array) -> Array:
    return jnp.sqrt(jnp.maximum(_pairwise_sq_distances(gram), 1e-12))  # the clamp keeps the gradient finite at 0


def rkd_distance(student_emb: Array, teacher_emb: Array, *, where: Array | None = None) -> Array:
    """Relational KD, distance term (Park et al. 2019): smooth-L1 between the pairwise distances of the student's
    and of the teacher's embeddings (N, D), each divided by its mean over the pairs. A scalar (pairs of examples).
    Takes ``where`` only (batch-relational: see the module docstring)."""
    fn = "rkd_distance"
    s, t = _f32(student_emb), jax.lax.stop_gradient(_f32(teacher_emb))
    _check_min_rank(fn, "student_emb", s, 2)
    _check_min_rank(fn, "teacher_emb", t, 2)
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"{fn}: {s.shape[0]} student embeddings but {t.shape[0]} teacher embeddings")
    mask = _pair_mask(fn, where, s.shape[0])
    pairs = (mask[:, None] & mask[None, :]) & ~jnp.eye(s.shape[0], dtype=bool)
    count = jnp.maximum(jnp.sum(pairs), 1)

    def normalised(e):
        d = _pairwise_distances(_centred_gram(e, mask))
        return d / jnp.maximum(jnp.sum(jnp.where(pairs, d, 0.0)) / count, 1e-12)

    diff = jnp.abs(normalised(s) - normalised(t))
    huber = jnp.where(diff < 1.0, 0.5 * jnp.square(diff), diff - 0.5)
    return jnp.sum(jnp.where(pairs, huber, 0.0)) / count


def rkd_angle(student_emb: Array, teacher_emb: Array, *, where: Array | None = None) -> Array:
    """Relational KD, angle term: smooth-L1 between the cosines of the angles (e_i - e_j, e_k - e_j) of every
    triplet, student against teacher. A scalar. The cosines come from the Gram matrix of the centred embeddings,
    so the cost is O(N^2 D + N^3) (N^3 D for explicit difference vectors: 19 min an epoch for SSD-KD on MNIST).
    Takes ``where`` only (batch-relational: see the module docstring)."""
    fn = "rkd_angle"
    s, t = _f32(student_emb), jax.lax.stop_gradient(_f32(teacher_emb))
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"{fn}: {s.shape[0]} student embeddings but {t.shape[0]} teacher embeddings")
    mask = _pair_mask(fn, where, s.shape[0])

    def cosines(e):
        # (e_i - e_j).(e_k - e_j) = G_ik - G_ij - G_jk + G_jj: O(N^2 D + N^3) rather than an O(N^3 D) contraction
        g = _centred_gram(e, mask)
        dots = g[None, :, :] - g.T[:, :, None] - g[:, None, :] + jnp.diagonal(g)[:, None, None]  # [j, i, k]
        inv_norm = 1.0 / jnp.sqrt(jnp.maximum(_pairwise_sq_distances(g), 1e-12))  # [j, i] = 1 / |e_i - e_j|
        return dots * inv_norm[:, :, None] * inv_norm[:, None, :]

    n = s.shape[0]
    eye = jnp.eye(n, dtype=bool)
    valid = (mask[:, None, None] & mask[None, :, None] & mask[None, None, :]) & ~eye[:, :, None] & ~eye[:, None, :]
    diff = jnp.abs(cosines(s) - cosines(t))
    huber = jnp.where(diff < 1.0, 0.5 * jnp.square(diff), diff - 0.5)
    return jnp.sum(jnp.where(valid, huber, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def triplet_margin(
    anchor: Array,
    positive: Array,
    negative: Array,
    margin: float = 0.2,
    *,
    where: Array | None = None,
    weights: Array | None = None,
    reduction: str = "mean",
) -> Array:
    """Per example ``max(0, |a - p|^2 - |a - n|^2 + margin)`` on L2-normalised embeddings (*batch, D): the anchor
    stays `margin` closer to its positive than to its negative. Takes ``where``, ``weights``, ``reduction``."""
    fn = "triplet_margin"
    _check_nonnegative(fn, "margin", margin)
    a, p, n = (_f32(x) for x in (anchor, positive, negative))
    _check_same_shape(fn, "anchor", a, "positive", p)
    _check_same_shape(fn, "anchor", a, "negative", n)
    a, p, n = (_masked(fn, where, x, x.ndim - 1) for x in (a, p, n))

    def unit(x):
        return x / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), 1e-12))

    a, p, n = unit(a), unit(p), unit(n)
    per_example = jnp.maximum(jnp.sum(jnp.square(a - p), -1) - jnp.sum(jnp.square(a - n), -1) + _f32(margin), 0.0)
    return _reduce(fn, per_example, where, weights, reduction)


def feature_kl(
    student_features: Array,
    teacher_features: Array,
    temperature: float = 4.0,
    *,
    axis: int = -1,
    where: Array | None = None,
    weights: Array | None = None,
    reduction: str = "mean",
) -> Array:
    """``T^2 * KL(softmax(h_t / T) || softmax(h_s / T))`` over the feature axis (``axis``, default -1) of (*batch, D)
    feature vectors: the teacher's feature distribution at a feature temperature (the penultimate-feature KD of the
    methods table). Takes ``axis``, ``where``, ``weights``, ``reduction``."""
    return kd_kl(
        student_features, teacher_features, temperature, axis=axis, where=where, weights=weights, reduction=reduction
    )


def mixture_kd(
    student_logits: Array,
    teacher_logits_a: Array,
    teacher_logits_b: Array,
    lam: float | Array,
    temperature: float | Array = 4.0,
    *,
    axis: int = -1,
    where: Array | None = None,
    weights: Array | None = None,
    reduction: str = "mean",
) -> Array:
    """MKD's loss-level mixture: ``T^2 * [lam KL(p_a || q) + (1 - lam) KL(p_b || q)]`` per example, where ``q`` is
    the student on the mixed input and ``p_a``, ``p_b`` the teacher on the two source images (not on the mix);
    `lam` a scalar or per example. By joint convexity it bounds the KD loss against the mixed teacher. Takes
    ``axis`` (the class axis, default -1), ``where``, ``weights``, ``reduction``."""
    fn = "mixture_kd"
    _check_positive(fn, "temperature", temperature)
    s, a, b = (
        _f32(student_logits),
        jax.lax.stop_gradient(_f32(teacher_logits_a)),
        jax.lax.stop_gradient(_f32(teacher_logits_b)),
    )
    _check_same_shape(fn, "student_logits", s, "teacher_logits_a", a)
    _check_same_shape(fn, "student_logits", s, "teacher_logits_b", b)
    s, a, b = (_class_last(fn, "logits", x, axis) for x in (s, a, b))
    s, a, b = (_masked(fn, where, x, x.ndim - 1) for x in (s, a, b))
    temp, lam = _f32(temperature), _f32(lam)
    log_q = jax.nn.log_softmax(s / temp, -1)
    per_example = (temp * temp) * (
        lam * _kl_from_logp(jax.nn.log_softmax(a / temp, -1), log_q)
        + (1.0 - lam) * _kl_from_logp(jax.nn.log_softmax(b / temp, -1), log_q)
    )
    return _reduce(fn, per_example, where, weights, reduction)


def channel_distillation(
    student_feats: Array,
    teacher_feats: Array,
    temperature: float = 4.0,
    *,
    where: Array | None = None,
    weights: Array | None = None,
    reduction: str = "mean",
) -> Array:
    """Channel-wise distillation (MTKD-SSR's stage-wise channel term, as Shu et al. 2021 define it): each channel's
    spatial map becomes a distribution (softmax over H*W at `temperature`); per example ``T^2 / C * sum_c
    KL(teacher_c || student_c)``. Feature maps (*batch, H, W, C) of equal shape (map the student first). Takes
    ``where``, ``weights``, ``reduction``."""
    fn = "channel_distillation"
    _check_positive(fn, "temperature", temperature)
    s, t = _f32(student_feats), jax.lax.stop_gradient(_f32(teacher_feats))
    _check_min_rank(fn, "student_feats", s, 4)
    _check_same_shape(fn, "student_feats", s, "teacher_feats", t)
    s, t = _masked(fn, where, s, s.ndim - 3), _masked(fn, where, t, t.ndim - 3)
    temp = _f32(temperature)

    def per_channel(x):  # (*batch, C, H*W)
        return jnp.swapaxes(x.reshape(*x.shape[:-3], -1, x.shape[-1]), -1, -2) / temp

    kl = _kl_from_logp(jax.nn.log_softmax(per_channel(t), -1), jax.nn.log_softmax(per_channel(s), -1))
    return _reduce(fn, (temp * temp) * jnp.mean(kl, axis=-1), where, weights, reduction)


def smoothness(
    features: list[Array],
    perturbed: list[Array],
    *,
    where: Array | None = None,
    weights: Array | None = None,
    reduction: str = "mean",
) -> Array:
    """PURF's regulariser on the model being trained (gradients flow into both arguments): per example
    ``sum_k |phi_k(x + delta) - phi_k(x)|^2 / |phi_k(x)|^2``, the relative change of each representation under a
    small input perturbation. Takes ``where``, ``weights``, ``reduction``."""
    fn = "smoothness"
    if len(features) != len(perturbed) or not features:
        raise ValueError(f"{fn}: {len(features)} clean and {len(perturbed)} perturbed representations")
    total = None
    for k, (f, g) in enumerate(zip(features, perturbed, strict=True)):
        f, g = _f32(f), _f32(g)
        _check_same_shape(fn, f"features[{k}]", f, f"perturbed[{k}]", g)
        axes = tuple(range(1, f.ndim))
        term = jnp.sum(jnp.square(g - f), axes) / jnp.maximum(jnp.sum(jnp.square(f), axes), 1e-12)
        total = term if total is None else total + term
    return _reduce(fn, total, where, weights, reduction)
