"""Feature losses of the KD zoo that need trainable parts or a stage of their own (issue #15, part 2): FSP flow
matrices, variational information distillation and activation boundaries, written from their papers' formulas and
checked against RepDistiller / mdistiller.

Features are (N, D) vectors or (N, H, W, C) maps. Every loss is per example and takes ``where`` / ``weights`` /
``reduction`` like the package's other losses (no ``axis``: the channel axis is last); teacher inputs get no
gradient; inputs are cast to float32 and the result is float32 whatever the input dtype (bf16 included).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from extkd_jax.losses._core import Array, _check_min_rank, _check_nonnegative, _check_positive, _f32, _masked, _reduce


def pool_to(x: Array, size: tuple[int, int]) -> Array:
    """Average pooling of NHWC maps down to spatial `size` (PyTorch's adaptive pooling for integer ratios)."""
    h, w = x.shape[1], x.shape[2]
    th, tw = size
    if h % th or w % tw:
        raise ValueError(f"cannot pool a {h}x{w} map to {th}x{tw}: the sizes need an integer ratio")
    return x.reshape(x.shape[0], th, h // th, tw, w // tw, x.shape[-1]).mean(axis=(2, 4))


def match_spatial(a: Array, b: Array) -> tuple[Array, Array]:
    """Two features at one spatial size: the larger map pooled to the smaller (RepDistiller's FSP / VID rule);
    a vector against a map: the map averaged over space."""
    if a.ndim == 2 or b.ndim == 2:
        return tuple(x if x.ndim == 2 else jnp.mean(x, axis=(1, 2)) for x in (a, b))
    if a.shape[1] > b.shape[1]:
        return pool_to(a, b.shape[1:3]), b
    if a.shape[1] < b.shape[1]:
        return a, pool_to(b, a.shape[1:3])
    return a, b


def _features(fn: str, name: str, x, where) -> Array:
    x = _f32(x)
    if x.ndim not in (2, 4):
        raise ValueError(f"{fn}: {name} must be (N, D) or (N, H, W, C), got shape {tuple(x.shape)}")
    return _masked(fn, where, x, 1)


def fsp_matrix(bottom: Array, top: Array) -> Array:
    """The flow of solution procedure between two layers (Yim et al. 2017): ``G[n, i, j]`` = the mean over
    positions of ``top[n, ..., i] * bottom[n, ..., j]``, after pooling the larger map to the smaller; (N, C_top,
    C_bottom). A vector is one position."""
    bottom, top = match_spatial(bottom, top)
    positions = 1 if bottom.ndim == 2 else bottom.shape[1] * bottom.shape[2]
    b = bottom.reshape(bottom.shape[0], positions, bottom.shape[-1])
    t = top.reshape(top.shape[0], positions, top.shape[-1])
    return jnp.einsum("npi,npj->nij", t, b) / positions


def fsp(
    student_segments: Sequence[Array],
    teacher_segments: Sequence[Array],
    *,
    where: Array | None = None,
    weights: Array | None = None,
    reduction: str = "mean",
) -> Array:
    """FSP (Yim et al. 2017) as RepDistiller computes it: the FSP matrix of each pair of consecutive segments of the
    student and of the teacher; per example, the sum over the pairs of the mean squared difference of the two
    matrices. Student and teacher need the same channel counts (map the student's segments first if not).
    Takes ``where``, ``weights``, ``reduction``."""
    fn = "fsp"
    if len(student_segments) != len(teacher_segments) or len(student_segments) < 2:
        raise ValueError(
            f"{fn}: needs the same number (>= 2) of student and teacher segments, got {len(student_segments)} and "
            f"{len(teacher_segments)}"
        )
    s = [_features(fn, f"student_segments[{k}]", x, where) for k, x in enumerate(student_segments)]
    t = [
        jax.lax.stop_gradient(_features(fn, f"teacher_segments[{k}]", x, where)) for k, x in enumerate(teacher_segments)
    ]
    per_example = 0.0
    for k in range(len(s) - 1):
        shape_s, shape_t = (s[k + 1].shape[-1], s[k].shape[-1]), (t[k + 1].shape[-1], t[k].shape[-1])
        if shape_s != shape_t:
            raise ValueError(
                f"{fn}: segments {k} and {k + 1} give student FSP matrices {shape_s} and teacher ones {shape_t}: the "
                "channel counts must match"
            )
        per_example = per_example + _fsp_distance(s[k], s[k + 1], t[k], t[k + 1])
    return _reduce(fn, per_example, where, weights, reduction)


def _fsp_distance(bottom_s: Array, top_s: Array, bottom_t: Array, top_t: Array) -> Array:
    """Per example, the mean squared difference of two FSP matrices. Between two vectors the matrices are outer
    products, and ``||a b^T - c d^T||^2 = |a|^2 |b|^2 - 2 (a.c)(b.d) + |c|^2 |d|^2`` avoids building them (an MLP's
    1200 x 1200 matrices per example would not fit in memory)."""
    if {bottom_s.ndim, top_s.ndim, bottom_t.ndim, top_t.ndim} == {2}:
        a, b, c, d = top_s, bottom_s, top_t, bottom_t

        def dot(x, y):
            return jnp.sum(x * y, axis=-1)

        squared = dot(a, a) * dot(b, b) - 2.0 * dot(a, c) * dot(b, d) + dot(c, c) * dot(d, d)
        return jnp.maximum(squared, 0.0) / (a.shape[-1] * b.shape[-1])
    g_s, g_t = fsp_matrix(bottom_s, top_s), fsp_matrix(bottom_t, top_t)
    return jnp.mean(jnp.square(g_s - g_t), axis=(1, 2))


def vid_variance(log_scale: Array, eps: float = 1e-5) -> Array:
    """VID's per-channel variance ``softplus(log_scale) + eps``."""
    return jax.nn.softplus(_f32(log_scale)) + eps


def vid_log_scale(init_variance: float, eps: float = 1e-5) -> float:
    """The `log_scale` whose `vid_variance` is `init_variance` (RepDistiller initialises it at 5)."""
    if not init_variance > eps:
        raise ValueError(f"vid_log_scale: init_variance={init_variance!r}; expected a variance above eps={eps}")
    return math.log(math.expm1(init_variance - eps))


def vid(
    student_mean: Array,
    teacher_feat: Array,
    log_scale: Array,
    eps: float = 1e-5,
    *,
    where: Array | None = None,
    weights: Array | None = None,
    reduction: str = "mean",
) -> Array:
    """Variational information distillation (Ahn et al. 2019): the negative log-likelihood of the teacher's feature
    under a Gaussian whose mean the student predicts (`student_mean`, from a regressor) and whose per-channel
    variance ``softplus(log_scale) + eps`` is learned: per example, the mean over positions and channels of
    ``0.5 * ((mean - t)^2 / var + log var)`` (the constant 0.5 log 2 pi left out, as in the reference).
    Takes ``where``, ``weights``, ``reduction``."""
    fn = "vid"
    _check_positive(fn, "eps", eps)
    mu = _features(fn, "student_mean", student_mean, where)
    t = jax.lax.stop_gradient(_features(fn, "teacher_feat", teacher_feat, where))
    if mu.shape != t.shape:
        raise ValueError(f"{fn}: student_mean shape {tuple(mu.shape)} != teacher_feat shape {tuple(t.shape)}")
    scale = _f32(log_scale)
    if scale.shape != (t.shape[-1],):
        raise ValueError(f"{fn}: log_scale shape {tuple(scale.shape)}, expected one value per channel ({t.shape[-1]},)")
    var = vid_variance(scale, eps)
    nll = 0.5 * (jnp.square(mu - t) / var + jnp.log(var))
    return _reduce(fn, jnp.mean(nll.reshape(nll.shape[0], -1), axis=-1), where, weights, reduction)


def activation_boundary(
    student_feat: Array,
    teacher_feat: Array,
    margin: float = 1.0,
    *,
    where: Array | None = None,
    weights: Array | None = None,
    reduction: str = "mean",
) -> Array:
    """Activation-boundary transfer (Heo et al. 2019), the alternative L2 loss: per example, the sum over neurons of
    ``(s + m)^2`` where the teacher's neuron is off (t <= 0) but the student's is above -m, plus ``(s - m)^2`` where
    the teacher's is on (t > 0) but the student's is at most m. The student's response `s` comes through a
    connector; the teacher's sign is the same before and after its ReLU.
    Takes ``where``, ``weights``, ``reduction``."""
    fn = "activation_boundary"
    _check_nonnegative(fn, "margin", margin)
    s = _features(fn, "student_feat", student_feat, where)
    t = jax.lax.stop_gradient(_features(fn, "teacher_feat", teacher_feat, where))
    if s.shape != t.shape:
        raise ValueError(f"{fn}: student_feat shape {tuple(s.shape)} != teacher_feat shape {tuple(t.shape)}")
    _check_min_rank(fn, "student_feat", s, 2)
    off = (s > -margin) & (t <= 0)
    on = (s <= margin) & (t > 0)
    per_neuron = jnp.where(off, jnp.square(s + margin), 0.0) + jnp.where(on, jnp.square(s - margin), 0.0)
    return _reduce(fn, jnp.sum(per_neuron.reshape(s.shape[0], -1), axis=-1), where, weights, reduction)


def factor(feat: Array, p: float = 2.0) -> Array:
    """Factor transfer's factor of a feature map (N, H, W, C): the mean over channels of ``|f|^p`` at each
    position, flattened and L2-normalised over the positions (RepDistiller's ``FactorTransfer.factor``)."""
    x = jnp.mean(jnp.power(jnp.abs(feat), p), axis=-1).reshape(feat.shape[0], -1)
    return x / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), 1e-24))


def factor_transfer(
    student_factor: Array,
    teacher_factor: Array,
    p1: float = 2.0,
    p2: float = 1.0,
    *,
    where: Array | None = None,
    weights: Array | None = None,
    reduction: str = "mean",
) -> Array:
    """Factor transfer (Kim et al. 2018), RepDistiller's loss: the larger map pooled to the smaller, each turned
    into its `factor` (power `p1`), and per example the mean over positions of ``|F_s - F_t|^p2``. The inputs are
    the translator's output (student) and the paraphraser's code (teacher); any channel counts.
    Takes ``where``, ``weights``, ``reduction``."""
    fn = "factor_transfer"
    _check_positive(fn, "p1", p1)
    _check_positive(fn, "p2", p2)
    s = _features(fn, "student_factor", student_factor, where)
    t = jax.lax.stop_gradient(_features(fn, "teacher_factor", teacher_factor, where))
    if s.ndim != 4 or t.ndim != 4:
        raise ValueError(f"{fn}: needs feature maps (N, H, W, C), got shapes {tuple(s.shape)} and {tuple(t.shape)}")
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"{fn}: {s.shape[0]} student examples but {t.shape[0]} teacher examples")
    s, t = match_spatial(s, t)
    diff = jnp.abs(factor(s, p1) - factor(t, p1))
    per_example = jnp.mean(diff if p2 == 1 else jnp.power(diff, p2), axis=-1)
    return _reduce(fn, per_example, where, weights, reduction)


HCL_LEVELS = (4, 2, 1)  # ReviewKD's pyramid: average pools to 4x4, 2x2 and 1x1


def hierarchical_context(
    student_maps: Sequence[Array],
    teacher_maps: Sequence[Array],
    levels: Sequence[int] = HCL_LEVELS,
    *,
    where: Array | None = None,
    weights: Array | None = None,
    reduction: str = "mean",
) -> Array:
    """ReviewKD's hierarchical context loss (Chen et al. 2021): for each pair of maps (N, H, W, C) of one shape, the
    MSE of the maps plus, for each pyramid level l < H in `levels` order, the MSE of both maps average-pooled to
    l x l weighted 1/2, 1/4, ..., all over the sum of the weights; summed over the pairs. Per example: the mean over
    positions and channels.
    Takes ``where``, ``weights``, ``reduction``."""
    fn = "hierarchical_context"
    if len(student_maps) != len(teacher_maps) or not student_maps:
        raise ValueError(
            f"{fn}: needs as many student as teacher maps (>= 1), got {len(student_maps)} and {len(teacher_maps)}"
        )
    per_example = 0.0
    for k, (s, t) in enumerate(zip(student_maps, teacher_maps, strict=True)):
        s = _features(fn, f"student_maps[{k}]", s, where)
        t = jax.lax.stop_gradient(_features(fn, f"teacher_maps[{k}]", t, where))
        if s.shape != t.shape or s.ndim != 4:
            raise ValueError(
                f"{fn}: pair {k} has student map {tuple(s.shape)} and teacher map {tuple(t.shape)}; expected maps "
                "(N, H, W, C) of one shape"
            )

        def mse(a, b):
            return jnp.mean(jnp.square(a - b).reshape(a.shape[0], -1), axis=-1)

        loss, weight, total = mse(s, t), 1.0, 1.0
        for level in levels:
            if level >= s.shape[1]:
                continue
            weight /= 2.0
            loss = loss + weight * mse(pool_to(s, (level, level)), pool_to(t, (level, level)))
            total += weight
        per_example = per_example + loss / total
    return _reduce(fn, per_example, where, weights, reduction)


def ofd_margin(bn_scale: Array, bn_bias: Array) -> Array:
    """OFD's margin per channel from the BN before a teacher's ReLU (Heo et al. 2019): the expectation of the
    pre-activation given that it is negative, for a Gaussian of mean `bn_bias` and standard deviation |`bn_scale`|;
    ``-3 |scale|`` where the probability of a negative value is below 0.001 (the authors' code)."""
    s = jnp.abs(_f32(bn_scale))
    m = _f32(bn_bias)
    z = -m / jnp.maximum(s, 1e-12)
    below = 0.5 * jax.scipy.special.erfc(-z / math.sqrt(2.0))  # P(x < 0) = Phi(-m / s)
    expectation = -s * jnp.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi) / jnp.maximum(below, 1e-30) + m
    return jnp.where(below > 0.001, expectation, -3.0 * s)


def ofd(
    student_feat: Array,
    teacher_feat: Array,
    margin: Array,
    *,
    where: Array | None = None,
    weights: Array | None = None,
    reduction: str = "mean",
) -> Array:
    """OFD's partial L2 (Heo et al. 2019, mdistiller's form) between the student's pre-activation (through a
    connector) and the teacher's, the teacher's negative values raised to the per-channel `margin`: per example,
    the sum over positions and channels of ``(s - m)^2`` where ``s > m >= t``, ``(s - t)^2`` where ``s > t`` and
    ``m < t <= 0``, and ``(s - t)^2`` where ``t > 0``. The larger map is pooled to the smaller. Deviation,
    declared: when the student's map is the larger, mdistiller resizes the teacher's map up to the student's
    (`F.interpolate`); ours pools the student's down, as RepDistiller's FSP and VID do. Equal sizes, the
    model pairs of our presets, are unaffected. Takes ``where``, ``weights``, ``reduction``."""
    fn = "ofd"
    s = _features(fn, "student_feat", student_feat, where)
    t = jax.lax.stop_gradient(_features(fn, "teacher_feat", teacher_feat, where))
    s, t = match_spatial(s, t)
    if s.shape != t.shape:
        raise ValueError(f"{fn}: student_feat {tuple(s.shape)} and teacher_feat {tuple(t.shape)} differ in channels")
    m = jax.lax.stop_gradient(_f32(margin))
    if m.shape != (t.shape[-1],):
        raise ValueError(f"{fn}: margin shape {tuple(m.shape)}, expected one value per channel ({t.shape[-1]},)")
    below = (s > m) & (t <= m)
    between = (s > t) & (t > m) & (t <= 0)
    positive = t > 0
    per = jnp.where(below, jnp.square(s - m), 0.0) + jnp.where(between | positive, jnp.square(s - t), 0.0)
    return _reduce(fn, jnp.sum(per.reshape(per.shape[0], -1), axis=-1), where, weights, reduction)


# KDSVD's singular vectors come from orthogonal iteration on the Gram matrix (matrix products only): XLA:CPU's
# LAPACK eigensolver hung inside a whole training step here, and the exact gradient of singular vectors,
# 1 / (s_i^2 - s_j^2), is unbounded wherever singular values repeat (dead channels); the iteration's is bounded.
# The error of vector i after the iterations is about (s_{i+1} / s_i)^(2 x SVD_ITERATIONS).
SVD_ITERATIONS = 100


def _canonical_signs(vectors: Array) -> Array:
    """+1 or -1 per column, so that each column's entry of largest magnitude is positive (a fixed sign)."""
    pick = jnp.take_along_axis(vectors, jnp.argmax(jnp.abs(vectors), axis=0)[None, :], axis=0)[0]
    return jnp.where(pick < 0, -1.0, 1.0)


def _orthonormal_columns(v: Array) -> Array:
    """Modified Gram-Schmidt on the columns of v (C, k); a column with nothing left becomes 0."""
    columns = []
    for j in range(v.shape[1]):
        c = v[:, j]
        for q in columns:
            c = c - jnp.dot(q, c) * q
        columns.append(c / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(c)), 1e-30)))
    return jnp.stack(columns, axis=1)


def top_right_singular_vectors(x: Array, k: int) -> tuple[Array, Array]:
    """(vectors (C, k), singular values (k,)) of `x` (P, C) for its `k` largest singular values, each vector signed
    so that its largest entry is positive. Orthogonal iteration on x^T x (SVD_ITERATIONS) from a fixed start;
    differentiable by automatic differentiation through the iterations."""
    x = _f32(x)
    channels = x.shape[-1]
    gram = x.T @ x
    scaled = gram / jnp.maximum(jnp.trace(gram), 1e-30)  # eigenvalues in [0, 1]: no overflow in any dtype
    # a fixed, generic start: no column orthogonal to the leading singular vectors
    start = jnp.cos(jnp.arange(channels, dtype=jnp.float32)[:, None] * (jnp.arange(k, dtype=jnp.float32) + 1.0) * 1.3)
    v = jax.lax.fori_loop(0, SVD_ITERATIONS, lambda _, v: _orthonormal_columns(scaled @ v), start + 0.5)
    v = v * jax.lax.stop_gradient(_canonical_signs(v))
    singular = jnp.sqrt(jnp.maximum(jnp.einsum("ck,cd,dk->k", v, gram, v), 0.0))
    return v, singular


def kdsvd(
    student_segments: Sequence[Array],
    teacher_segments: Sequence[Array],
    k: int = 1,
    *,
    where: Array | None = None,
    weights: Array | None = None,
    reduction: str = "mean",
) -> Array:
    """KD with singular value decomposition (Lee et al. 2018), RepDistiller's form: per segment, each example's map
    (H*W, C) gives its top right singular vectors, `k` for the teacher and `k + 3` for the student; each teacher
    vector is matched by the student vector of largest |cosine| (sign flipped to agree); both are scaled by the
    teacher's top-k singular values L2-normalised; between consecutive segments an RBF
    ``exp(-(v_i - v_j)^2 / 8)`` relates every channel of one to every channel of the other, and the loss is the sum
    of the squared differences of the student's and teacher's RBF matrices. Student and teacher need the same
    channel counts; vector segments are refused.
    Takes ``where``, ``weights``, ``reduction``."""
    fn = "kdsvd"
    if len(student_segments) != len(teacher_segments) or len(student_segments) < 2:
        raise ValueError(
            f"{fn}: needs the same number (>= 2) of student and teacher segments, got {len(student_segments)} and "
            f"{len(teacher_segments)}"
        )
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"{fn}: k must be a positive integer, got {k!r}")
    per_example, previous = 0.0, None
    for idx, (s, t) in enumerate(zip(student_segments, teacher_segments, strict=True)):
        s = _features(fn, f"student_segments[{idx}]", s, where)
        t = jax.lax.stop_gradient(_features(fn, f"teacher_segments[{idx}]", t, where))
        if s.ndim != 4 or t.ndim != 4 or s.shape[-1] != t.shape[-1]:
            raise ValueError(
                f"{fn}: segment {idx}: student {tuple(s.shape)} and teacher {tuple(t.shape)}; expected maps "
                "(N, H, W, C) with equal channel counts"
            )
        if s.shape[-1] < k + 3:
            raise ValueError(f"{fn}: segment {idx} has {s.shape[-1]} channels; k + 3 = {k + 3} vectors are needed")
        xs, xt = s.reshape(s.shape[0], -1, s.shape[-1]), t.reshape(t.shape[0], -1, t.shape[-1])
        v_t, singular = jax.vmap(lambda a: top_right_singular_vectors(a, k))(xt)  # (N, C, k), (N, k)
        v_t, singular = jax.lax.stop_gradient(v_t), jax.lax.stop_gradient(singular)
        singular = singular / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(singular), -1, keepdims=True), 1e-24))
        v_s, _ = jax.vmap(lambda a: top_right_singular_vectors(a, k + 3))(xs)  # (N, C, k + 3)
        cosine = jnp.einsum("nci,ncj->nij", v_s, v_t)  # (N, k + 3, k)
        best = jnp.max(jnp.abs(cosine), axis=1, keepdims=True)
        match = jax.lax.stop_gradient(jnp.where(jnp.abs(cosine) == best, jnp.sign(cosine), 0.0))
        v_s = jnp.einsum("nci,nij->ncj", v_s, match) * singular[:, None, :]
        v_t = v_t * singular[:, None, :]
        if previous is not None:
            prev_s, prev_t = previous

            def rbf(a, b):
                return jnp.exp(-jnp.square(a[:, :, None, :] - b[:, None, :, :]) / 8.0)

            diff = jnp.square(rbf(v_s, prev_s) - rbf(v_t, prev_t))
            per_example = per_example + jnp.sum(diff.reshape(diff.shape[0], -1), -1)
        previous = (v_s, v_t)
    return _reduce(fn, per_example, where, weights, reduction)
