"""Shared pieces of the losses: argument checks (named errors), and the per-example reduction every loss uses."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Segments = Sequence[Any] | Mapping[Any, Any] | Any  # a list, a dict or any pytree of arrays
SegmentWeights = None | float | Array | Sequence[Any] | Mapping[Any, Any] | Any
REDUCTIONS = ("mean", "sum", "none")


def _f32(x: Any) -> Array:
    return jnp.asarray(x).astype(jnp.float32)


def _check_min_rank(fn: str, name: str, x: Array, rank: int) -> None:
    try:
        chex.assert_rank(x, set(range(rank, max(rank, x.ndim) + 1)))
    except AssertionError as err:
        raise ValueError(f"{fn}: {name} must have at least {rank} axes, got shape {tuple(x.shape)}") from err


def _check_same_shape(fn: str, name_a: str, a: Array, name_b: str, b: Array) -> None:
    try:
        chex.assert_equal_shape([a, b])
    except AssertionError as err:
        raise ValueError(f"{fn}: {name_a} shape {tuple(a.shape)} != {name_b} shape {tuple(b.shape)}") from err


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


def _class_last(fn: str, name: str, x: Array, axis: Any) -> Array:
    """``x`` with its class axis ``axis`` moved last (the batch shape is then every other axis, in order)."""
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise ValueError(f"{fn}: axis must be an integer, got {axis!r}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{fn}: axis={axis} is out of range for {name} of shape {tuple(x.shape)}")
    return x if axis in (-1, x.ndim - 1) else jnp.moveaxis(x, int(axis), -1)


def _check_logit_pair(fn: str, student_logits: Any, teacher_logits: Any, axis: int = -1) -> tuple[Array, Array]:
    s, t = _f32(student_logits), _f32(teacher_logits)
    _check_min_rank(fn, "student_logits", s, 1)
    _check_same_shape(fn, "student_logits", s, "teacher_logits", t)
    s, t = _class_last(fn, "student_logits", s, axis), _class_last(fn, "teacher_logits", t, axis)
    return s, jax.lax.stop_gradient(t)


def _check_labels(fn: str, logits: Array, labels: Any) -> Array:
    """Integer labels of the batch shape, in range when concrete."""
    labels = jnp.asarray(labels)
    batch = tuple(logits.shape[:-1])
    if tuple(labels.shape) != batch:
        raise ValueError(
            f"{fn}: labels shape {tuple(labels.shape)} does not match the batch shape {batch} of "
            f"logits shape {tuple(logits.shape)}"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"{fn}: labels must be integers (or soft targets of the logits' shape), got dtype {labels.dtype}"
        )
    if not isinstance(labels, jax.core.Tracer) and labels.size:
        lab = np.asarray(labels)
        if lab.min() < 0 or lab.max() >= logits.shape[-1]:
            raise ValueError(f"{fn}: labels must lie in [0, {logits.shape[-1]}), got range [{lab.min()}, {lab.max()}]")
    return labels


def _where_mask(fn: str, where: Any, batch: tuple[int, ...]) -> Array:
    """``where`` as a boolean array of the batch shape; a ValueError naming the loss otherwise."""
    mask = jnp.asarray(where)
    if tuple(mask.shape) != batch:
        raise ValueError(f"{fn}: where shape {tuple(mask.shape)} != batch shape {batch}")
    if mask.dtype != jnp.bool_:
        raise ValueError(f"{fn}: where must be boolean, got dtype {mask.dtype}")
    return mask


def _masked(fn: str, where: Any, x: Array, batch_ndim: int) -> Array:
    """``x`` with its masked-out examples set to 0 before any arithmetic, so that garbage in padded rows (NaN, inf)
    reaches neither the value nor the gradient (a ``where`` after the fact would still multiply NaN by 0)."""
    if where is None:
        return x
    batch = tuple(x.shape[:batch_ndim])
    mask = _where_mask(fn, where, batch)
    return jnp.where(mask.reshape(batch + (1,) * (x.ndim - batch_ndim)), x, 0)


def _example_weights(fn: str, batch: tuple[int, ...], where: Any, weights: Any) -> Array | None:
    """``weights * where`` as float32 of the batch shape, or None when both are None."""
    w = None
    if weights is not None:
        w = _f32(weights)
        if tuple(w.shape) != batch:
            raise ValueError(f"{fn}: weights shape {tuple(w.shape)} != batch shape {batch}")
        if not isinstance(weights, jax.core.Tracer) and np.any(np.asarray(w) < 0):
            raise ValueError(f"{fn}: weights must be >= 0, got min {float(np.min(np.asarray(w)))}")
    if where is not None:
        mask = _where_mask(fn, where, batch)
        w = mask.astype(jnp.float32) if w is None else w * mask
    return w


def sum_and_count(per_example: Array, where: Any = None, weights: Any = None) -> tuple[Array, Array]:
    """``(sum(w * l), sum(w))`` over every axis, ``w = weights * where`` (1 where not given).

    The two numbers that make a correct global mean of a batch split over devices and padded: inside
    ``shard_map``, ``psum(s) / psum(c)`` (see ``docs/losses.md``); a per-device mean of means is wrong when the
    devices hold different numbers of real examples.
    """
    loss = _f32(per_example)
    w = _example_weights("sum_and_count", tuple(loss.shape), where, weights)
    if w is None:
        return jnp.sum(loss), jnp.asarray(loss.size, jnp.float32)
    # where() keeps a masked NaN/inf (e.g. a padded garbage row) out of the sum and of its gradient
    return jnp.sum(jnp.where(w > 0, w * loss, 0.0)), jnp.sum(w)


def reduce_loss(per_example: Array, where: Any = None, weights: Any = None, reduction: str = "mean") -> Array:
    """Reduces a per-example loss (any shape) as every loss of this module does; see the module docstring."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {REDUCTIONS}")
    loss = _f32(per_example)
    if reduction == "none":
        w = _example_weights("reduce_loss", tuple(loss.shape), where, weights)
        return loss if w is None else jnp.where(w > 0, w * loss, 0.0)
    total, count = sum_and_count(loss, where, weights)
    if reduction == "sum":
        return total
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def _reduce(fn: str, per_example: Array, where, weights, reduction: str) -> Array:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction={reduction!r}: expected one of {REDUCTIONS}")
    _example_weights(fn, tuple(per_example.shape), where, weights)  # shape errors name the loss
    return reduce_loss(per_example, where, weights, reduction)


def _kl_from_logp(log_p: Array, log_q: Array) -> Array:
    """KL(p || q) over the last axis from finite log-probabilities (no 0 * log 0 arises: log_p is finite)."""
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
