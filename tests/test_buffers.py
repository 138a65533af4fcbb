"""State that is neither a parameter nor a statistic (CRD's memory banks, OFD's margins) is a `Buffer`: carried by
the step with the statistics, untouched by the optimizer, and a checkpoint written while it was `nnx.BatchStat`
restores into it unchanged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from extkd_jax.methods import crd, ofd
from extkd_jax.models import common
from extkd_jax.models.common import Buffer
from extkd_jax.train.checkpoint import Checkpointer
from extkd_jax.train.step import Student, split


def _student(seed: int = 0) -> Student:
    """A student with a BatchNorm (a statistic), CRD's memory (banks, normalisers) and OFD's margins."""
    rngs = nnx.Rngs(seed)
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs))
    labels = np.array([0, 1, 0, 2, 1, 2])
    memory = crd.ContrastMemory(4, 5, labels, 8, rngs=rngs, dtype=jnp.float32)
    margins = ofd.Margins([jnp.arange(3.0) + seed, jnp.arange(2.0) - 5.0])
    return Student(model, heads=[margins], projector=memory)


def _old_student(monkeypatch) -> Student:
    """The same student as built before `Buffer` existed: its buffers were `nnx.BatchStat`."""
    with monkeypatch.context() as m:
        m.setattr(crd, "Buffer", nnx.BatchStat)
        m.setattr(ofd, "Buffer", nnx.BatchStat)
        return _student()


def _buffers(module: nnx.Module) -> dict:
    return {path: type(v) for path, v in nnx.iter_graph(module) if isinstance(v, nnx.Variable) and path[0] != "model"}


def test_banks_and_margins_are_buffers_carried_with_the_statistics_not_trained():
    student = _student()
    types = _buffers(student)
    banks = [p for p, t in types.items() if p[-1] in ("memory_student", "memory_teacher", "normalisers", "flat")]
    assert len(banks) == 4 and all(types[p] is Buffer for p in banks), types
    _, variables = split(student)
    stats = jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]
    stat_names = {str(path[-1].key) for path, _ in stats}
    assert {"memory_student", "memory_teacher", "normalisers", "flat", "mean", "var"} == stat_names
    param_names = {str(path[-1].key) for path, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]}
    assert not param_names & {"memory_student", "memory_teacher", "normalisers", "flat"}
    # the optimizer sees the parameters only: an update moves them and leaves every buffer as it was
    tx = optax.sgd(0.1)
    grads = jax.tree.map(jnp.ones_like, variables["params"])
    updates, _ = tx.update(grads, tx.init(variables["params"]), variables["params"])
    moved = optax.apply_updates(variables["params"], updates)
    assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(variables["params"])))


def test_a_checkpoint_written_with_batchstat_buffers_restores_into_buffers(tmp_path, monkeypatch):
    old_graph, old_variables = split(_old_student(monkeypatch))
    assert nnx.BatchStat in set(_buffers(old_graph.merge(old_variables)).values())  # really the old layout
    # the saved trees are pure dicts: the same layout whatever the variable type
    new_graph, new_variables = split(_student(seed=1))  # other initial values: the restore must bring the old ones
    assert jax.tree.structure(old_variables) == jax.tree.structure(new_variables)

    Checkpointer(tmp_path / "old").save(3, {"state": old_variables})
    step, restored = Checkpointer(tmp_path / "old", create=False).restore_latest({"state": new_variables})
    assert step == 3
    module = new_graph.merge(restored["state"])
    for a, b in zip(jax.tree.leaves(old_variables), jax.tree.leaves(restored["state"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert isinstance(module.projector.memory_student, Buffer)
    assert isinstance(module.heads[0].flat, Buffer)
    np.testing.assert_array_equal(
        np.asarray(module.projector.memory_teacher[...]),
        np.asarray(old_variables["batch_stats"]["projector"]["memory_teacher"]),
    )
    np.testing.assert_array_equal(np.concatenate(module.heads[0].values()), [0.0, 1.0, 2.0, -5.0, -4.0])
    # the restored student carries its buffers forward like a fresh one: statistics and buffers in one tree
    _, again = split(module)
    assert jax.tree.structure(again) == jax.tree.structure(new_variables)


def test_state_filter_names_both_kinds():
    assert common.STATE == (nnx.BatchStat, Buffer)
    assert not issubclass(Buffer, (nnx.Param, nnx.BatchStat))
