"""Builds the networks of a run: student (+ connectors) and the frozen teacher loaded from its workdir."""

from __future__ import annotations

import pathlib
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from extkd_jax.models import Connector, create_model, forward_with_segments
from extkd_jax.train.state import ModelParts, StudentWithConnectors, split_model
from extkd_jax.train.workdir import read_config

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(name: str, kwargs, num_classes: int, seed: int, dtype) -> nnx.Module:
    return create_model(
        name, num_classes, rngs=nnx.Rngs(params=seed, dropout=seed + 1), dtype=dtype, **dict(kwargs)
    )


def segment_shapes(parts: ModelParts, input_shape: tuple[int, ...], attr: str | None = None):
    """Shapes (batch axis included) of a model's segments, computed abstractly (no FLOPs)."""

    def segments(params, batch_stats, x):
        model = parts.merge(params, batch_stats)
        model = getattr(model, attr) if attr else model
        return forward_with_segments(model, x, train=False)[1]

    out = jax.eval_shape(
        segments, parts.params, parts.batch_stats, jax.ShapeDtypeStruct(input_shape, jnp.float32)
    )
    return [tuple(s.shape) for s in out]


def build_student(
    config, num_classes: int, input_shape, pairs, teacher_shapes, dtype
) -> StudentWithConnectors:
    """Student plus one Connector per (student, teacher) segment pair of fitnet / extended_kd."""
    student = build_model(config.model.name, config.model.kwargs, num_classes, config.seed, dtype)
    connectors = []
    if pairs and config.loss.name in ("fitnet", "extended_kd"):
        student_shapes = segment_shapes(split_model(student), input_shape)
        rngs = nnx.Rngs(params=config.seed + 7)
        for s, t in pairs:
            connectors.append(Connector(student_shapes[s][1:], teacher_shapes[t][1:], rngs=rngs, dtype=dtype))
    return StudentWithConnectors(student, connectors)


def _match_keys(template: Any, raw: Any, where: str) -> Any:
    """Rebuilds `raw` (restored without a target: string keys) in the structure of `template`."""
    if isinstance(template, dict):
        if not isinstance(raw, dict):
            raise ValueError(f"checkpoint entry {where} is not a mapping")
        out = {}
        for key, sub in template.items():
            value = raw.get(key, raw.get(str(key)))
            if value is None:
                raise ValueError(f"checkpoint lacks {where}/{key}: it was written by another architecture")
            out[key] = _match_keys(sub, value, f"{where}/{key}")
        return out
    raw = np.asarray(raw)
    if raw.shape != np.shape(template):
        raise ValueError(
            f"checkpoint entry {where} has shape {raw.shape}, the model expects {np.shape(template)}: "
            "it was written by another architecture"
        )
    return raw


def latest_readable_state(workdir: pathlib.Path) -> dict:
    """The newest checkpoint of a workdir restored as raw nested dicts (no target needed)."""
    directory = pathlib.Path(workdir).absolute() / "checkpoints"
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
    try:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))[
                    "state"
                ]
            except Exception as err:  # fall back to the previous checkpoint
                warnings.warn(
                    f"checkpoint step {step} in {directory} could not be restored "
                    f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}); "
                    "falling back to an older one"
                )
    finally:
        manager.close()
    raise FileNotFoundError(f"no readable checkpoint under {directory}")


def require_workdir(workdir: str | pathlib.Path) -> pathlib.Path:
    """The workdir as a Path; a clear error when it is missing or a file."""
    workdir = pathlib.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"workdir {workdir} is a file, not a directory")
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    return workdir


def load_trained_model(workdir: str | pathlib.Path, dtype=jnp.float32, expected_name: str = ""):
    """(ModelParts of the trained model, its config) from the workdir of an `extkd train`/`distill` run."""
    workdir = require_workdir(workdir)
    record, config = read_config(workdir)
    if expected_name and expected_name != config.model.name:
        raise ValueError(
            f"the checkpoint in {workdir} is a {config.model.name!r}; expected {expected_name!r}"
        )
    if record.get("kind") not in ("train", "distill"):
        raise ValueError(
            f"{workdir} holds a `{record.get('kind')}` run, not one trained model; point to one of its runs, "
            f"e.g. {workdir / 'teacher'} or {workdir / 'runs'}/<method>/seed_0"
        )
    num_classes = int(record["num_classes"])
    model = build_model(config.model.name, config.model.kwargs, num_classes, config.seed, dtype)
    parts = split_model(model)
    raw = latest_readable_state(workdir)
    params = _match_keys(parts.params, raw["params"]["student"], "params/student")
    stats = _match_keys(
        parts.batch_stats, raw.get("batch_stats", {}).get("student", {}), "batch_stats/student"
    )
    return ModelParts(parts.graphdef, params, stats, parts.other), config
