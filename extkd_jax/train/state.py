"""Train state as a plain pytree, and the split of an NNX model into what trains and what does not.

The student and its connectors live in one NNX module (`StudentWithConnectors`) so that one optimizer updates
both. Parameters and BatchNorm statistics are kept as pure dicts: they checkpoint with orbax as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
from flax import nnx


class StudentWithConnectors(nnx.Module):
    """The trained network: a student plus one connector per distilled segment."""

    def __init__(self, student: nnx.Module, connectors: Sequence[nnx.Module]):
        self.student = student
        self.connectors = nnx.List(list(connectors))


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """What `nnx.split` gives, with the trainable and statistic parts as pure dicts."""

    graphdef: Any
    params: Any
    batch_stats: Any
    other: Any  # dropout RngState and the like: constant, never trained or checkpointed

    def merge(self, params=None, batch_stats=None) -> nnx.Module:
        return nnx.merge(
            self.graphdef,
            self.params if params is None else params,
            self.batch_stats if batch_stats is None else batch_stats,
            self.other,
        )


def split_model(model: nnx.Module) -> ModelParts:
    graphdef, params, batch_stats, other = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    return ModelParts(graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats), other)


def init_train_state(parts: ModelParts, tx) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=parts.params,
        batch_stats=parts.batch_stats,
        opt_state=tx.init(parts.params),
    )
