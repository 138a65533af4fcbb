"""The optax-shaped loss API: per-example values, `where` / `weights`, reductions, soft targets, any batch shape, and
the correct global mean of a padded batch split over devices (shard_map) against a single-device reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from extkd_jax import losses
from tests.test_losses import ref_ce, ref_kd
from tests.tiny import REPO_ROOT


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def _pair(rng, shape=(6, 5)):
    return (rng.normal(size=shape) * 2).astype(np.float32), (rng.normal(size=shape) * 2).astype(np.float32)


def test_per_example_values_against_row_references(rng):
    s, t = _pair(rng)
    y = rng.integers(0, 5, size=6)
    kd = np.asarray(losses.kd_kl(s, t, 3.0, reduction="none"))
    ce = np.asarray(losses.cross_entropy(s, y, reduction="none"))
    assert kd.shape == ce.shape == (6,)
    for i in range(6):
        np.testing.assert_allclose(kd[i], ref_kd(s[i : i + 1], t[i : i + 1], 3.0), rtol=1e-5)
        np.testing.assert_allclose(ce[i], ref_ce(s[i : i + 1], y[i : i + 1]), rtol=1e-5)
    assert float(losses.kd_kl(s, t, 3.0, reduction="sum")) == pytest.approx(kd.sum(), rel=1e-5)
    assert float(losses.kd_kl(s, t, 3.0)) == pytest.approx(kd.mean(), rel=1e-5)  # the default stays the mean


def test_where_and_weights_on_every_loss(rng):
    s, t = _pair(rng)
    y = rng.integers(0, 5, size=6)
    feats_s, feats_t = rng.normal(size=(6, 4, 4, 3)), rng.normal(size=(6, 4, 4, 2))
    where = np.array([True, True, False, True, False, True])
    weights = np.array([1.0, 2.0, 5.0, 0.5, 3.0, 1.0], np.float32)
    calls = {
        "kd_kl": lambda **kw: losses.kd_kl(s, t, 2.0, **kw),
        "cross_entropy": lambda **kw: losses.cross_entropy(s, y, **kw),
        "dkd": lambda **kw: losses.dkd(s, t, y, **kw),
        "segment_mse": lambda **kw: losses.segment_mse([s], [t], **kw),
        "attention_transfer": lambda **kw: losses.attention_transfer(feats_s, feats_t, **kw),
        "extended_kd_loss": lambda **kw: losses.extended_kd_loss(s, t, y, [s], [t], **kw)[0],
    }
    for name, call in calls.items():
        per = np.asarray(call(reduction="none"), np.float64)
        w = weights * where
        expected = (per * w).sum() / w.sum()
        got = float(call(where=where, weights=weights))
        assert got == pytest.approx(expected, rel=1e-5), name
        # masked-out examples count for nothing, whatever their values
        assert float(call(where=where)) == pytest.approx(per[where].mean(), rel=1e-5), name
        assert float(call(where=np.zeros(6, bool))) == 0.0, name


def test_masked_garbage_cannot_leak_into_value_or_gradient(rng):
    s, t = _pair(rng)
    s[2] = np.nan  # a padded row
    where = np.arange(6) != 2
    value, grad = jax.value_and_grad(lambda x: losses.kd_kl(x, t, where=where))(s)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)[where]))
    np.testing.assert_array_equal(np.asarray(grad)[2], 0.0)


def test_soft_targets_match_one_hot_and_a_mixture(rng):
    s, _ = _pair(rng)
    y = rng.integers(0, 5, size=6)
    one_hot = np.eye(5, dtype=np.float32)[y]
    np.testing.assert_allclose(losses.cross_entropy(s, one_hot), losses.cross_entropy(s, y), rtol=1e-6)
    lam = 0.3
    y2 = np.roll(y, 1)
    mixed = lam * one_hot + (1 - lam) * np.eye(5, dtype=np.float32)[y2]
    expected = lam * ref_ce(s, y) + (1 - lam) * ref_ce(s, y2)  # CE is linear in the target
    assert float(losses.cross_entropy(s, mixed)) == pytest.approx(expected, rel=1e-5)
    smoothed = float(losses.cross_entropy(s, mixed, 0.1))
    assert smoothed == pytest.approx(0.9 * expected + 0.1 * float(np.mean(-jax.nn.log_softmax(s).mean(-1))), rel=1e-5)


def test_any_leading_batch_shape_equals_the_flat_batch(rng):
    s, t = _pair(rng, (2, 3, 5))
    y = rng.integers(0, 5, size=(2, 3))
    fs, ft = rng.normal(size=(2, 3, 4, 4, 3)), rng.normal(size=(2, 3, 4, 4, 3))
    flat = (s.reshape(6, 5), t.reshape(6, 5), y.reshape(6))
    assert losses.kd_kl(s, t, reduction="none").shape == (2, 3)
    np.testing.assert_allclose(losses.kd_kl(s, t), losses.kd_kl(flat[0], flat[1]), rtol=1e-6)
    np.testing.assert_allclose(losses.cross_entropy(s, y), losses.cross_entropy(flat[0], flat[2]), rtol=1e-6)
    np.testing.assert_allclose(losses.dkd(s, t, y), losses.dkd(flat[0], flat[1], flat[2]), rtol=1e-6)
    np.testing.assert_allclose(
        losses.attention_transfer(fs, ft),
        losses.attention_transfer(fs.reshape(6, 4, 4, 3), ft.reshape(6, 4, 4, 3)),
        rtol=1e-6,
    )
    total, parts = losses.extended_kd_loss(s, t, y, [fs], [ft])
    flat_total, _ = losses.extended_kd_loss(*flat[:2], flat[2], [fs.reshape(6, 4, 4, 3)], [ft.reshape(6, 4, 4, 3)])
    np.testing.assert_allclose(total, flat_total, rtol=1e-6)
    assert parts["segment"].shape == ()


def test_bad_masks_and_reductions_are_named(rng):
    s, t = _pair(rng)
    with pytest.raises(ValueError, match=r"kd_kl: where shape \(5,\) != batch shape \(6,\)"):
        losses.kd_kl(s, t, where=np.ones(5, bool))
    with pytest.raises(ValueError, match="kd_kl: where must be boolean"):
        losses.kd_kl(s, t, where=np.ones(6))
    with pytest.raises(ValueError, match=r"reduction='avg': expected one of \('mean', 'sum', 'none'\)"):
        losses.kd_kl(s, t, reduction="avg")


@pytest.mark.slow
def test_padded_batch_global_mean_under_shard_map():
    """4 devices, 10 real examples padded to 12: psum of (sum, count) gives the single-device mean; the mean of
    per-device means does not."""
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, PartitionSpec as P
        from extkd_jax import losses
        rng = np.random.default_rng(0)
        s = rng.normal(size=(12, 7)).astype(np.float32); t = rng.normal(size=(12, 7)).astype(np.float32)
        where = np.arange(12) < 10
        s[10:] = 1e30  # padding rows hold garbage
        mesh = Mesh(np.asarray(jax.devices()), ("data",))
        def local(s, t, where):
            total, count = losses.sum_and_count(losses.kd_kl(s, t, 4.0, reduction="none"), where=where)
            naive = losses.kd_kl(s, t, 4.0, where=where)
            return jax.lax.psum(total, "data") / jax.lax.psum(count, "data"), jax.lax.pmean(naive, "data")
        fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P("data")), out_specs=(P(), P())))
        good, naive = fn(s, t, where)
        reference = losses.kd_kl(s[:10], t[:10], 4.0)
        print(json.dumps({{"devices": jax.device_count(), "good": float(good), "naive": float(naive),
                          "reference": float(reference)}}))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4
    assert result["good"] == pytest.approx(result["reference"], rel=1e-6)
    assert abs(result["naive"] - result["reference"]) > 1e-3  # 3 real rows on 3 devices, 1 on the last
