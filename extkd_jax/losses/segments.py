"""Segments as pytrees: the student's and the teacher's intermediate outputs paired by their paths, and one weight
per segment.

Segments may be a list, a dict, or any nested pytree of arrays: what Linen's ``apply(..., mutable=["intermediates"])``
returns (``{"intermediates": {"block1": {"seg": (array,)}}}``), a ``flax.traverse_util.flatten_dict`` result, an NNX
``State``. They are flattened with ``jax.tree_util.tree_flatten_with_path`` (dict keys sorted, sequences in order),
and student and teacher are paired by path. A path is written ``"intermediates/block1/seg/0"``: the keys, indices
and attribute names joined by ``/``.

Segment weights are None (all 1), a scalar, a sequence (one weight per top-level entry of sequence segments, or per
segment in flattened order), or a pytree / mapping whose leaves are scalars: a weight applies to every segment whose
path starts with the weight's own path (a nested dict of the segments' shape, a prefix of it such as
``{"intermediates": {"block1": 2.0, "block2": 1.0}}``, or a flat mapping keyed by path strings such as
``{"intermediates/block1/seg/0": 2.0}``); the longest matching path wins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from extkd_jax.losses._core import _concrete_scalar, _is_scalar

Path = tuple[str, ...]


@dataclass(frozen=True)
class Segment:
    """One student/teacher pair: ``path`` (string components), ``name`` (``"a/b/0"``) and ``label`` for errors."""

    path: Path
    name: str
    label: str
    student: Any
    teacher: Any
    top_index: int | None  # the index of its top-level entry when the segments are a list or tuple


def _key_parts(key: Any) -> list[str]:
    """The string components of one key of a jax key path (a key holding ``/`` splits into several)."""
    if isinstance(key, jax.tree_util.DictKey):
        raw = key.key
    elif isinstance(key, jax.tree_util.SequenceKey):
        raw = key.idx
    elif isinstance(key, jax.tree_util.GetAttrKey):
        raw = key.name
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
        raw = key.key
    else:
        raw = key
    return [part for part in str(raw).split("/") if part != ""]


def path_of(key_path: Sequence[Any]) -> Path:
    """``("intermediates", "block1", "seg", "0")`` for the key path of ``tree["intermediates"]["block1"]["seg"][0]``."""
    return tuple(part for key in key_path for part in _key_parts(key))


def _label(key_path: Sequence[Any], name: str) -> str:
    # the flat forms keep their old names: "segment 1" for a list entry, "segment 'b'" for a dict entry
    if len(key_path) == 1 and isinstance(key_path[0], jax.tree_util.SequenceKey):
        return f"segment {key_path[0].idx}"
    return f"segment {name!r}"


def _names(paths: Any) -> str:
    return "[" + ", ".join(sorted(repr("/".join(p)) for p in paths)) + "]"


def _flatten(fn: str, arg: str, tree: Any) -> list[tuple[Path, Sequence[Any], Any]]:
    if isinstance(tree, (str, bytes)) or hasattr(tree, "shape") or tree is None:
        raise ValueError(
            f"{fn}: {arg} must be a sequence, a mapping or a pytree of arrays (wrap a single array in a list), "
            f"got {type(tree).__name__}"
        )
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    out, seen = [], {}
    for key_path, leaf in leaves:
        path = path_of(key_path)
        if not path:
            raise ValueError(
                f"{fn}: {arg} must be a sequence, a mapping or a pytree of arrays, got {type(tree).__name__}"
            )
        if path in seen:
            raise ValueError(
                f"{fn}: {arg} has two segments at path {'/'.join(path)!r} "
                f"({jax.tree_util.keystr(seen[path])} and {jax.tree_util.keystr(key_path)})"
            )
        seen[path] = key_path
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")) and not _is_scalar(leaf):
            raise ValueError(f"{fn}: {arg} at {'/'.join(path)!r} must be an array, got {type(leaf).__name__}")
        out.append((path, key_path, leaf))
    return out


def segment_pairs(fn: str, student: Any, teacher: Any) -> list[Segment]:
    """The segments of ``student`` in its flattened order, each with the teacher's segment at the same path."""
    if isinstance(student, Mapping) != isinstance(teacher, Mapping):
        raise ValueError(
            f"{fn}: student_segments is {type(student).__name__} but teacher_segments is "
            f"{type(teacher).__name__}; both must be sequences or both mappings"
        )
    s_items = _flatten(fn, "student_segments", student)
    t_items = {path: leaf for path, _, leaf in _flatten(fn, "teacher_segments", teacher)}
    s_paths = {path for path, _, _ in s_items}
    if s_paths != set(t_items):
        if isinstance(student, Sequence) and isinstance(teacher, Sequence) and len(student) != len(teacher):
            raise ValueError(
                f"{fn}: segment count differs: {len(student)} student segments vs {len(teacher)} teacher segments"
            )
        raise ValueError(
            f"{fn}: segment keys differ: only in student_segments {_names(s_paths - set(t_items))}, "
            f"only in teacher_segments {_names(set(t_items) - s_paths)}"
        )
    if not s_items:
        kind = "mappings" if isinstance(student, Mapping) else "sequences"
        raise ValueError(f"{fn}: no segments given (empty {kind}, or no arrays among their leaves)")
    out = []
    for path, key_path, leaf in s_items:
        name = "/".join(path)
        top = key_path[0].idx if isinstance(key_path[0], jax.tree_util.SequenceKey) else None
        out.append(Segment(path, name, _label(key_path, name), leaf, t_items[path], top))
    return out


def _flat_sequence(weights: Any) -> list[Any] | None:
    """The weights as a list when they are a 1-D array or a sequence of scalars, else None (a pytree)."""
    if hasattr(weights, "shape"):
        return list(weights)
    if isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)) and all(map(_is_scalar, weights)):
        return list(weights)
    return None


def _by_prefix(fn: str, arg: str, weights: Any, segments: list[Segment]) -> list[Any]:
    """One weight per segment from a pytree of scalars: the weight at the longest path that prefixes the segment's."""
    items = [(path_of(k), w) for k, w in jax.tree_util.tree_flatten_with_path(weights)[0]]
    for path, w in items:
        if not _is_scalar(w):
            raise ValueError(f"{fn}: {arg} at {'/'.join(path)!r} must be a scalar, got {w!r}")
    out, used, missing = [], set(), []
    for seg in segments:
        matches = [(len(p), i) for i, (p, _) in enumerate(items) if seg.path[: len(p)] == p]
        if not matches:
            missing.append(seg.path)
            continue
        _, best = max(matches)
        used.add(best)
        out.append(items[best][1])
    unused = [p for i, (p, _) in enumerate(items) if i not in used]
    if missing or unused:
        raise ValueError(
            f"{fn}: {arg} keys {_names(p for p, _ in items)} != segment keys "
            f"[{', '.join(repr(s.name) for s in segments)}]: no weight for {_names(missing)}, "
            f"no segment under {_names(unused)}"
        )
    return out


def segment_weight_list(fn: str, weights: Any, segments: list[Segment], student: Any, arg: str) -> list[Any]:
    """One non-negative scalar weight per segment, in the order of ``segments`` (None -> 1); see the module doc."""
    if weights is None:
        return [1.0] * len(segments)
    if _is_scalar(weights):
        v = _concrete_scalar(weights)
        if v is not None and not v >= 0:
            raise ValueError(f"{fn}: {arg} must be >= 0, got {weights!r}")
        return [weights] * len(segments)
    if hasattr(weights, "shape") and np.ndim(weights) != 1:
        raise ValueError(f"{fn}: {arg} must be a scalar or one weight per segment, got shape {np.shape(weights)}")
    flat = _flat_sequence(weights)
    if flat is None:
        out = _by_prefix(fn, arg, weights, segments)
    elif all(s.top_index is not None for s in segments) and len(flat) == len(student):
        out = [flat[seg.top_index] for seg in segments]  # one weight per top-level entry (its whole subtree)
    elif len(flat) == len(segments):
        out = flat
    else:
        raise ValueError(
            f"{fn}: {arg} has {len(flat)} entries for {len(segments)} segments (order: {[s.name for s in segments]})"
        )
    for seg, w in zip(segments, out):
        if not _is_scalar(w):
            raise ValueError(f"{fn}: {arg} for {seg.label} must be a scalar, got {w!r}")
        v = _concrete_scalar(w)
        if v is not None and not v >= 0:
            raise ValueError(f"{fn}: {arg} for {seg.label} must be >= 0, got {w!r}")
    return out
