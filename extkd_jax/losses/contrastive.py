"""Contrastive representation distillation (CRD, Tian et al. 2020) as pure functions: the scores of embeddings
against a memory bank, the NCE loss on them, the momentum update of the bank and the sampling of negatives.

The memory banks, embedding heads and normalisation constants are the caller's state (extkd_jax keeps them in the
student-side state, `methods.crd.ContrastMemory`); these functions only compute. RepDistiller's `crd` (its
`ContrastMemory` and `ContrastLoss`) is the reference read; the formulas are the paper's. The loss, crd_nce, takes
``where`` / ``weights`` / ``reduction``; every function computes and returns float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from extkd_jax.losses._core import Array, _check_min_rank, _check_positive, _f32, _reduce, _where_mask

NCE_EPS = 1e-7  # RepDistiller's eps in the NCE posteriors


def unit_rows(x: Array) -> Array:
    """Rows L2-normalised (an all-zero row stays 0), in float32."""
    x = _f32(x)
    return x / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), 1e-24))


def contrast_scores(embedding: Array, memory: Array, contrast_idx: Array, temperature: float = 0.07) -> Array:
    """``exp(<memory[contrast_idx[i, k]], embedding[i]> / temperature)``, shape (N, K+1): the unnormalised scores of
    each embedding (N, D) against its rows of the memory bank (M, D). The memory gets no gradient.

    Computed as the (N, M) matrix of every score, then gathered: O(N M D) arithmetic and O(N M) memory instead of the
    O(N K D) of gathering the bank rows (K = 16384 negatives is larger than most transfer sets are long).
    """
    fn = "contrast_scores"
    _check_positive(fn, "temperature", temperature)
    e, m = _f32(embedding), jax.lax.stop_gradient(_f32(memory))
    _check_min_rank(fn, "embedding", e, 2)
    if e.ndim != 2 or m.ndim != 2 or e.shape[1] != m.shape[1]:
        raise ValueError(f"{fn}: expected embedding (N, D) and memory (M, D), got {e.shape} and {m.shape}")
    idx = jnp.asarray(contrast_idx)
    if idx.ndim != 2 or idx.shape[0] != e.shape[0] or not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ValueError(
            f"{fn}: contrast_idx must be integers of shape ({e.shape[0]}, K+1), got {idx.dtype} {idx.shape}"
        )
    every = e @ m.T  # (N, M)
    return jnp.exp(jnp.take_along_axis(every, idx, axis=1) / temperature)


def crd_nce(
    scores: Array,
    num_data: int,
    eps: float = NCE_EPS,
    *,
    where: Array | None = None,
    weights: Array | None = None,
    reduction: str = "mean",
) -> Array:
    """CRD's NCE loss on normalised scores P (N, K+1), the positive first: with noise probability Pn = 1 / num_data,
    per example ``-(log(P_i0 / (P_i0 + K Pn + eps)) + sum_{k>0} log(K Pn / (P_ik + K Pn + eps)))``; the default
    mean over the batch is RepDistiller's loss. Takes ``where``, ``weights``, ``reduction`` (each example's term
    uses only its own row of scores; the normalisation of the scores, the caller's, is what couples the batch)."""
    fn = "crd_nce"
    _check_positive(fn, "num_data", num_data)
    p = _f32(scores)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"{fn}: expected scores of shape (N, K+1) with K >= 1 negatives, got {p.shape}")
    if where is not None:  # masked rows become 1: finite logs, so no NaN even in the gradient's discarded branch
        p = jnp.where(_where_mask(fn, where, p.shape[:1])[:, None], p, 1.0)
    noise = (p.shape[1] - 1) / num_data  # K * Pn
    positive = jnp.log(p[:, 0] / (p[:, 0] + noise + eps))
    negative = jnp.sum(jnp.log(noise / (p[:, 1:] + noise + eps)), axis=-1)
    return _reduce(fn, -(positive + negative), where, weights, reduction)


def momentum_update(memory: Array, idx: Array, embedding: Array, momentum: float = 0.5) -> Array:
    """The memory bank with rows `idx` replaced by ``unit(momentum * memory[idx] + (1 - momentum) * embedding)``
    (no gradient). A row appearing twice in `idx` gets one of its updates."""
    m, e = _f32(memory), jax.lax.stop_gradient(_f32(embedding))
    if m.ndim != 2 or e.ndim != 2 or m.shape[1] != e.shape[1] or jnp.shape(idx) != (e.shape[0],):
        raise ValueError(
            f"momentum_update: expected memory (M, D), embedding (N, D), idx (N,), "
            f"got {m.shape}, {e.shape}, {jnp.shape(idx)}"
        )
    rows = unit_rows(momentum * m[idx] + (1.0 - momentum) * e)
    return jax.lax.stop_gradient(m.at[idx].set(rows))


def sample_negatives(
    key: jax.Array, labels: Array, order: Array, class_start: Array, class_count: Array, k: int
) -> Array:
    """K indices per example (N, K), drawn uniformly with replacement among the examples of the other classes
    (RepDistiller's 'exact' mode). `order` lists the data set's examples grouped by class; class c occupies
    ``order[class_start[c] : class_start[c] + class_count[c]]``. The r-th example outside class c is ``order[r]``
    below its block and ``order[r + class_count[c]]`` from it on."""
    labels = jnp.asarray(labels)
    start, count = class_start[labels][:, None], class_count[labels][:, None]
    others = order.shape[0] - count
    r = jnp.floor(jax.random.uniform(key, (labels.shape[0], k)) * others).astype(jnp.int32)
    r = jnp.minimum(r, others - 1)
    return order[jnp.where(r < start, r, r + count)]
