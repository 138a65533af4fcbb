"""CRD's pure pieces against float64 NumPy references written with loops, and CRD through the training engine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from extkd_jax import losses
from tests.test_methods import _run

RTOL = 2e-5


@pytest.fixture
def rng():
    return np.random.default_rng(11)


def ref_scores(emb, memory, idx, temperature):
    out = np.zeros(idx.shape)
    for i in range(idx.shape[0]):
        for k in range(idx.shape[1]):
            out[i, k] = np.exp(np.dot(memory[idx[i, k]], emb[i]) / temperature)
    return out


def ref_nce(p, num_data, eps=1e-7):
    n, k1 = p.shape
    noise = (k1 - 1) / num_data
    total = 0.0
    for i in range(n):
        total += np.log(p[i, 0] / (p[i, 0] + noise + eps))
        for k in range(1, k1):
            total += np.log(noise / (p[i, k] + noise + eps))
    return -total / n


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_scores_and_nce_against_numpy(rng):
    emb, memory = _unit(rng.normal(size=(5, 8))), _unit(rng.normal(size=(30, 8)))
    idx = rng.integers(0, 30, size=(5, 7))
    scores = losses.contrast_scores(emb, memory, idx, 0.5)
    np.testing.assert_allclose(scores, ref_scores(emb, memory, idx, 0.5), rtol=RTOL)
    z = ref_scores(emb, memory, idx, 0.5).mean() * 30  # the first step's normaliser
    np.testing.assert_allclose(
        losses.crd_nce(scores / z, 30), ref_nce(ref_scores(emb, memory, idx, 0.5) / z, 30), rtol=RTOL
    )


def test_nce_gradient_matches_finite_differences(rng):
    """d/d(embedding) of NCE(scores(embedding)) in float64 against central differences of the NumPy reference."""
    emb, memory = rng.normal(size=(4, 6)), _unit(rng.normal(size=(20, 6)))
    idx = rng.integers(0, 20, size=(4, 5))

    def ref(e):
        return ref_nce(ref_scores(e, memory, idx, 2.0) / 3.0, 20)

    with jax.enable_x64():
        grad = np.asarray(
            jax.grad(lambda e: losses.crd_nce(losses.contrast_scores(e, memory, idx, 2.0) / 3.0, 20))(
                jnp.asarray(emb, jnp.float32)
            )
        )
    numeric = np.zeros_like(emb)
    h = 1e-6
    for i in np.ndindex(emb.shape):
        up, down = emb.copy(), emb.copy()
        up[i] += h
        down[i] -= h
        numeric[i] = (ref(up) - ref(down)) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-4)


def test_memory_gets_no_gradient_and_scores_check_shapes(rng):
    emb, memory = rng.normal(size=(3, 4)), rng.normal(size=(10, 4))
    idx = np.zeros((3, 2), np.int32)
    g = jax.grad(lambda m: jnp.sum(losses.contrast_scores(emb, m, idx)))(jnp.asarray(memory, jnp.float32))
    assert not np.any(np.asarray(g))
    with pytest.raises(ValueError, match="contrast_scores: expected embedding"):
        losses.contrast_scores(emb, memory[:, :3], idx)
    with pytest.raises(ValueError, match="contrast_idx must be integers of shape"):
        losses.contrast_scores(emb, memory, idx[:2])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        losses.contrast_scores(emb, memory, idx, 0.0)
    with pytest.raises(ValueError, match="crd_nce: expected scores of shape"):
        losses.crd_nce(np.ones((3, 1)), 10)


def test_momentum_update_against_numpy(rng):
    memory, emb = rng.normal(size=(8, 4)), rng.normal(size=(3, 4))
    idx = np.array([5, 0, 2])
    out = np.asarray(losses.momentum_update(memory, idx, emb, 0.5))
    want = memory.copy()
    for row, i in enumerate(idx):
        v = 0.5 * memory[i] + 0.5 * emb[row]
        want[i] = v / np.linalg.norm(v)
    np.testing.assert_allclose(out, want, rtol=RTOL, atol=1e-6)
    with pytest.raises(ValueError, match="momentum_update: expected memory"):
        losses.momentum_update(memory, idx[:2], emb, 0.5)


def test_negatives_come_uniformly_from_the_other_classes(rng):
    labels = np.array([0, 0, 1, 2, 2, 2, 1, 0, 2, 1])
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    anchors = np.array([0, 1, 2])
    draws = np.asarray(
        losses.sample_negatives(
            jax.random.key(0), anchors, jnp.asarray(order), jnp.asarray(start), jnp.asarray(counts), 6000
        )
    )
    assert draws.shape == (3, 6000)
    for row, c in enumerate(anchors):
        assert not np.any(labels[draws[row]] == c)  # never the anchor's class
        others = np.flatnonzero(labels != c)
        freq = np.bincount(draws[row], minlength=10)[others] / 6000
        np.testing.assert_allclose(freq, 1 / len(others), atol=0.03)  # every other example, equally often


def test_crd_trains_its_heads_and_updates_its_banks_and_normalisers():
    """One step on a 16-example transfer set (all rows in the batch): the banks' rows become unit vectors, the
    normalisers are fixed on the first step and kept after it, and the banks travel in the checkpointed stats."""
    overrides = {"loss.crd.negatives": 32, "loss.crd.dim": 16}
    metrics, program, state = _run("crd", steps=1, **overrides)
    before = program.variables["batch_stats"]["projector"]
    after = jax.tree.map(np.asarray, state.batch_stats["projector"])
    for bank in ("memory_student", "memory_teacher"):
        assert after[bank].shape == (16, 16)
        np.testing.assert_allclose(np.linalg.norm(after[bank], axis=1), 1.0, rtol=1e-5)
        assert not np.allclose(after[bank], before[bank])
    z1 = after["normalisers"]
    assert np.all(z1 > 0) and np.all(np.asarray(before["normalisers"]) < 0)
    _, _, state3 = _run("crd", steps=3, **overrides)
    np.testing.assert_allclose(np.asarray(state3.batch_stats["projector"]["normalisers"]), z1, rtol=1e-6)
    assert np.isfinite(metrics["contrast"]).all() and metrics["contrast"][0] > 0
    assert "embed_teacher" in program.variables["params"]["projector"]  # the teacher's head is trained too


def test_crd_refuses_a_pipeline_without_example_positions():
    from extkd_jax.train.config_checks import ConfigError, check_config
    from tests.tiny import tiny_config

    config = tiny_config(".", **{"loss.name": "crd", "teacher.workdir": "/t", "data.pipeline": "stream"})
    with pytest.raises(ConfigError, match="loss.name='crd' keeps a memory row per transfer example"):
        check_config(config, "distill")
    with pytest.raises(ValueError, match="needs the transfer set's labels"):
        _crd_without_labels()


def _crd_without_labels():
    from tests.tiny import random_teacher, tiny_config, tiny_setup

    config = tiny_config(".", **{"model.name": "resnet8", "loss.name": "crd"})
    config.model.kwargs = {}
    tiny_setup(config, (8, 8, 3), 1, random_teacher("resnet8"))
