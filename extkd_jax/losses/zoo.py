"""The standard KD baselines of RepDistiller and mdistiller (issue #15), written from their papers' formulas: PKT,
RKD, similarity-preserving KD, neuron selectivity transfer, DIST, correlation congruence, logit-standardised KD.

Every function follows the package contract: inputs cast to float32 and a float32 result whatever the input dtype
(bf16 included), no teacher gradient, named shape errors. Losses that compare examples within a batch (pkt, rkd,
similarity_preserving, correlation_congruence, dist, mlkd) take (N, ...) inputs, return one scalar for the batch and
take only ``where`` (masked-out examples leave every pair they are in). They take no ``weights``: each term couples
two (or three) examples, so a per-example weight has no term of its own to scale, and weighting the pairs by
``w_i w_j`` would be another loss than the paper's (with 0/1 weights it is exactly ``where``). They take no
``reduction``: there is no per-example value for ``"none"`` to return, and ``"sum"`` would be the mean times a
count that depends on the method (N^2 pairs, N^3 triplets). The per-example ones (nst, logit_standardized_kd) take
``where`` / ``weights`` / ``reduction`` like every other loss, and logit_standardized_kd the class ``axis``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from extkd_jax.losses._core import (
    Array,
    _check_min_rank,
    _check_nonnegative,
    _check_positive,
    _class_last,
    _f32,
    _masked,
    _reduce,
)
from extkd_jax.losses.logits import kd_kl
from extkd_jax.losses.relations import _pair_mask, rkd_angle, rkd_distance


def _batch_pair(fn: str, student: Any, teacher: Any) -> tuple[Array, Array]:
    """Student and teacher features (N, ...) as float32 (N, D_s), (N, D_t); the teacher without gradient."""
    s, t = _f32(student), jax.lax.stop_gradient(_f32(teacher))
    _check_min_rank(fn, "student_feat", s, 2)
    _check_min_rank(fn, "teacher_feat", t, 2)
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"{fn}: {s.shape[0]} student examples (shape {s.shape}) but {t.shape[0]} teacher examples")
    return s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)


def _unit_rows(x: Array, mask: Array) -> Array:
    """Rows L2-normalised; masked rows (and all-zero rows) become 0, whatever they held (NaN included)."""
    x = jnp.where(mask[:, None], x, 0.0)
    return x / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), 1e-24))


def _pair_mean(values: Array, mask: Array) -> Array:
    """Mean of an (N, N) matrix over the pairs of unmasked examples (the diagonal included)."""
    pairs = mask[:, None] & mask[None, :]
    return jnp.sum(jnp.where(pairs, values, 0.0)) / jnp.maximum(jnp.sum(pairs), 1)


def pkt(student_feat: Array, teacher_feat: Array, eps: float = 1e-7, *, where: Array | None = None) -> Array:
    """Probabilistic knowledge transfer (Passalis & Tefas 2018), RepDistiller's cosine form: rows L2-normalised,
    cosine similarities mapped to [0, 1] by (s + 1) / 2 and normalised per row into conditional probabilities;
    the mean over all N x N entries of ``t * log((t + eps) / (s + eps))``. Takes ``where`` only (batch-relational:
    see the module docstring)."""
    fn = "pkt"
    _check_positive(fn, "eps", eps)
    s, t = _batch_pair(fn, student_feat, teacher_feat)
    mask = _pair_mask(fn, where, s.shape[0])
    pairs = mask[:, None] & mask[None, :]

    def conditional(x):
        u = _unit_rows(x, mask)
        similarity = jnp.where(pairs, (u @ u.T + 1.0) / 2.0, 0.0)
        return similarity / jnp.maximum(jnp.sum(similarity, -1, keepdims=True), 1e-12)

    p_s, p_t = conditional(s), conditional(t)
    return _pair_mean(p_t * jnp.log((p_t + eps) / (p_s + eps)), mask)


def rkd(
    student_feat: Array,
    teacher_feat: Array,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
    *,
    where: Array | None = None,
) -> Array:
    """Relational KD (Park et al. 2019) as RepDistiller weighs and averages it: ``distance_weight`` x smooth-L1 of
    the pairwise distances (each set divided by the mean of its positive entries) averaged over all N x N entries,
    plus ``angle_weight`` x smooth-L1 of the cosines of (e_i - e_j, e_k - e_j) averaged over all N^3 entries. The
    entries with a zero difference vector (i = j, k = j) are 0 on both sides and count in the averages. Takes
    ``where`` only (batch-relational: see the module docstring)."""
    fn = "rkd"
    _check_nonnegative(fn, "distance_weight", distance_weight)
    _check_nonnegative(fn, "angle_weight", angle_weight)
    s, t = _batch_pair(fn, student_feat, teacher_feat)
    mask = _pair_mask(fn, where, s.shape[0])
    s, t = jnp.where(mask[:, None], s, 0.0), jnp.where(mask[:, None], t, 0.0)  # masked garbage reaches nothing
    n = jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)
    # rkd_distance / rkd_angle average over the N(N-1) pairs and N(N-1)^2 triplets of distinct examples
    share = (n - 1.0) / n
    return distance_weight * share * rkd_distance(s, t, where=where) + angle_weight * share * share * rkd_angle(
        s, t, where=where
    )


def similarity_preserving(student_feat: Array, teacher_feat: Array, *, where: Array | None = None) -> Array:
    """Similarity-preserving KD (Tung & Mori 2019): G = F F^T of the flattened features (N, D), rows of G
    L2-normalised; ``||G_t - G_s||_F^2 / N^2``. Takes ``where`` only (batch-relational: see the module docstring)."""
    fn = "similarity_preserving"
    s, t = _batch_pair(fn, student_feat, teacher_feat)
    mask = _pair_mask(fn, where, s.shape[0])

    def gram(x):
        x = jnp.where(mask[:, None], x, 0.0)
        return _unit_rows(x @ x.T, mask)

    return _pair_mean(jnp.square(gram(t) - gram(s)), mask)


def correlation_congruence(
    student_feat: Array, teacher_feat: Array, gamma: float = 0.4, *, where: Array | None = None
) -> Array:
    """Correlation congruence (Peng et al. 2019): the correlation between examples by a Gaussian RBF kernel,
    ``C_ij = exp(-gamma |f_i - f_j|^2)`` on L2-normalised embeddings (computed exactly, not by the paper's Taylor
    expansion); ``||C_t - C_s||_F^2 / N^2``. Student and teacher dimensions may differ. Takes ``where`` only
    (batch-relational: see the module docstring)."""
    fn = "correlation_congruence"
    _check_positive(fn, "gamma", gamma)
    s, t = _batch_pair(fn, student_feat, teacher_feat)
    mask = _pair_mask(fn, where, s.shape[0])

    def correlation(x):
        u = _unit_rows(x, mask)  # |u_i - u_j|^2 = 2 - 2 u_i . u_j for unit rows
        return jnp.exp(-gamma * jnp.maximum(2.0 - 2.0 * (u @ u.T), 0.0))

    return _pair_mean(jnp.square(correlation(t) - correlation(s)), mask)


def _pearson_rows(a: Array, b: Array, mask: Array | None, eps: float = 1e-8) -> Array:
    """Pearson correlation of each row of a and b (N, C) over the last axis (DIST's form, eps in the denominator)."""
    if mask is not None:
        count = jnp.maximum(jnp.sum(mask), 1)
        a = a - jnp.sum(jnp.where(mask[None, :], a, 0.0), -1, keepdims=True) / count
        b = b - jnp.sum(jnp.where(mask[None, :], b, 0.0), -1, keepdims=True) / count
        a, b = jnp.where(mask[None, :], a, 0.0), jnp.where(mask[None, :], b, 0.0)
    else:
        a, b = a - jnp.mean(a, -1, keepdims=True), b - jnp.mean(b, -1, keepdims=True)
    norm_a = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(a), -1), 1e-30))
    norm_b = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(b), -1), 1e-30))
    return jnp.sum(a * b, -1) / (norm_a * norm_b + eps)


def dist(
    student_logits: Array,
    teacher_logits: Array,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    *,
    where: Array | None = None,
) -> Array:
    """DIST (Huang et al. 2022): with ``p = softmax(logits / T)`` over a batch (N, C),
    ``T^2 (beta (1 - mean_n pearson(p_s[n], p_t[n])) + gamma (1 - mean_c pearson(p_s[:, c], p_t[:, c])))``:
    the inter-class relation (each example's classes) and the intra-class relation (each class over the batch).
    Takes ``where`` only (batch-relational: see the module docstring); no ``axis``: the inputs are (N, C)."""
    fn = "dist"
    _check_positive(fn, "temperature", temperature)
    _check_nonnegative(fn, "beta", beta)
    _check_nonnegative(fn, "gamma", gamma)
    s, t = _f32(student_logits), jax.lax.stop_gradient(_f32(teacher_logits))
    if s.ndim != 2 or s.shape != t.shape:
        raise ValueError(
            f"{fn}: expected student and teacher logits of one shape (N, C), got {tuple(s.shape)} and {tuple(t.shape)}"
        )
    mask = _pair_mask(fn, where, s.shape[0])
    temp = _f32(temperature)
    p_s = jax.nn.softmax(jnp.where(mask[:, None], s, 0.0) / temp, -1)
    p_t = jax.nn.softmax(jnp.where(mask[:, None], t, 0.0) / temp, -1)
    count = jnp.maximum(jnp.sum(mask), 1)
    inter = 1.0 - jnp.sum(jnp.where(mask, _pearson_rows(p_s, p_t, None), 0.0)) / count
    intra = 1.0 - jnp.mean(_pearson_rows(p_s.T, p_t.T, mask))
    return temp * temp * (beta * inter + gamma * intra)


def nst(
    student_feat: Array,
    teacher_feat: Array,
    *,
    where: Array | None = None,
    weights: Array | None = None,
    reduction: str = "mean",
) -> Array:
    """Neuron selectivity transfer (Huang & Wang 2017): per example, each channel's activation map (*batch, H, W, C)
    flattened over space and L2-normalised, then the squared MMD with the polynomial kernel ``k(x, y) = (x . y)^2``
    between the teacher's and the student's channels: ``mean k(t, t) - 2 mean k(s, t) + mean k(s, s)``. Equal H, W;
    the channel counts may differ. Takes ``where``, ``weights``, ``reduction``."""
    fn = "nst"
    s, t = _f32(student_feat), jax.lax.stop_gradient(_f32(teacher_feat))
    _check_min_rank(fn, "student_feat", s, 4)
    _check_min_rank(fn, "teacher_feat", t, 4)
    if s.shape[:-1] != t.shape[:-1]:
        raise ValueError(
            f"{fn}: student_feat {tuple(s.shape)} and teacher_feat {tuple(t.shape)} differ in batch or spatial "
            "shape (*batch, H, W) (only the channel counts may differ)"
        )
    if where is not None:
        keep = jnp.asarray(where)
        if tuple(keep.shape) != tuple(s.shape[:-3]):
            raise ValueError(f"{fn}: where shape {tuple(keep.shape)} != batch shape {tuple(s.shape[:-3])}")
        s, t = (jnp.where(keep[..., None, None, None], x, 0.0) for x in (s, t))

    def channels(x):  # (*batch, C, H*W), each channel a unit vector
        x = jnp.swapaxes(x.reshape(*x.shape[:-3], -1, x.shape[-1]), -1, -2)
        return x / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), 1e-24))

    cs, ct = channels(s), channels(t)

    def kernel_mean(a, b):
        return jnp.mean(jnp.square(jnp.einsum("...ip,...jp->...ij", a, b)), axis=(-2, -1))

    per_example = kernel_mean(ct, ct) - 2.0 * kernel_mean(cs, ct) + kernel_mean(cs, cs)
    return _reduce(fn, per_example, where, weights, reduction)


def _standardised(logits: Array) -> Array:
    """Each logit vector minus its mean over the sample standard deviation (ddof=1, torch's default), + 1e-7."""
    centred = logits - jnp.mean(logits, -1, keepdims=True)
    variance = jnp.sum(jnp.square(centred), -1, keepdims=True) / max(logits.shape[-1] - 1, 1)
    return centred / (jnp.sqrt(jnp.maximum(variance, 1e-30)) + 1e-7)


def logit_standardized_kd(
    student_logits: Array,
    teacher_logits: Array,
    temperature: float | Array = 2.0,
    *,
    axis: int = -1,
    where: Array | None = None,
    weights: Array | None = None,
    reduction: str = "mean",
) -> Array:
    """Logit-standardised KD (Sun et al., CVPR 2024): Hinton's ``T^2 KL`` between the z-scores of the teacher's and
    the student's logits (each vector minus its mean, over its sample standard deviation), so the student matches
    the teacher's logit relations, not their range. Takes ``axis`` (the class axis, default -1), ``where``,
    ``weights``, ``reduction``."""
    fn = "logit_standardized_kd"
    s, t = _f32(student_logits), _f32(teacher_logits)
    _check_min_rank(fn, "student_logits", s, 1)
    if s.shape != t.shape:
        raise ValueError(f"{fn}: student_logits shape {tuple(s.shape)} != teacher_logits shape {tuple(t.shape)}")
    s, t = _class_last(fn, "student_logits", s, axis), _class_last(fn, "teacher_logits", t, axis)
    if s.shape[-1] < 2:
        raise ValueError(f"{fn}: standardising needs at least 2 classes, got logits of shape {tuple(s.shape)}")
    s, t = _masked(fn, where, s, s.ndim - 1), _masked(fn, where, t, t.ndim - 1)  # before any arithmetic
    return kd_kl(
        _standardised(s),
        _standardised(t),
        temperature,
        where=where,
        weights=weights,
        reduction=reduction,
    )


MLKD_TEMPERATURES = (2.0, 3.0, 5.0, 6.0)  # the reference's extra temperatures, next to the configured one


def mlkd(
    student_logits: Array,
    teacher_logits: Array,
    temperatures: Sequence[float] = (4.0, *MLKD_TEMPERATURES),
    *,
    batch_invariant: bool = False,
    level_weights: Sequence[float] = (1.0, 1.0, 1.0),
    where: Array | None = None,
) -> Array:
    """Multi-level logit distillation (Jin et al., CVPR 2023) on one view of the batch (N, C): for each temperature
    T, with ``P = softmax(logits / T)``, instance level ``T^2 KL(P_t || P_s)`` (mean over examples) + class level
    ``||P_t^T P_t - P_s^T P_s||_F^2 / C`` + batch level ``||P_t P_t^T - P_s P_s^T||_F^2 / N``, summed over T.
    The reference's second, strongly augmented view and its median-confidence masks (which scale its reduced
    weak-view terms by about one half) are left out.

    The class level grows as (N / C)^2 and the batch level as N / C; the reference ran with N <= C (CIFAR-100,
    ImageNet). `batch_invariant=True` scales both by ``C / N^2`` instead: the same value at N = C, and no growth
    with the batch (at N = 256, C = 10 the reference's terms diverge an MNIST student). `level_weights`
    (instance, class, batch) scale the three levels, for ablations; the reference is (1, 1, 1).
    Takes ``where`` only (batch-relational: see the module docstring); no ``axis``: the inputs are (N, C)."""
    fn = "mlkd"
    if len(level_weights) != 3 or any(not w >= 0 for w in level_weights):
        raise ValueError(
            f"{fn}: level_weights={tuple(level_weights)!r}, expected 3 weights >= 0 (instance, class, batch)"
        )
    w_instance, w_class, w_batch = (float(w) for w in level_weights)
    s, t = _f32(student_logits), jax.lax.stop_gradient(_f32(teacher_logits))
    if s.ndim != 2 or s.shape != t.shape:
        raise ValueError(
            f"{fn}: expected student and teacher logits of one shape (N, C), got {tuple(s.shape)} and {tuple(t.shape)}"
        )
    if len(temperatures) == 0:
        raise ValueError(f"{fn}: temperatures is empty")
    for temperature in temperatures:
        _check_positive(fn, "temperatures", temperature)
    mask = _pair_mask(fn, where, s.shape[0])
    count = jnp.maximum(jnp.sum(mask), 1)
    s, t = jnp.where(mask[:, None], s, 0.0), jnp.where(mask[:, None], t, 0.0)
    total = 0.0
    for temperature in temperatures:
        instance = kd_kl(s, t, temperature, where=mask)
        p_s = jnp.where(mask[:, None], jax.nn.softmax(s / temperature, -1), 0.0)
        p_t = jnp.where(mask[:, None], jax.nn.softmax(t / temperature, -1), 0.0)
        classes = jnp.sum(jnp.square(p_t.T @ p_t - p_s.T @ p_s))
        batch = jnp.sum(jnp.square(p_t @ p_t.T - p_s @ p_s.T))
        if batch_invariant:
            classes, batch = classes * s.shape[-1] / count**2, batch * s.shape[-1] / count**2
        else:
            classes, batch = classes / s.shape[-1], batch / count
        total = total + w_instance * instance + w_class * classes + w_batch * batch
    return total
