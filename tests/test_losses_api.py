"""The optax-shaped loss API: per-example values, `where` / `weights`, reductions, soft targets, any batch shape, and
the correct global mean of a padded batch split over devices (shard_map) against a single-device reference."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
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


# ----------------------------------------------------------------------------------------------------------------
# which keyword arguments each loss takes (docs/losses.md's table), `axis`, the float32 output, crd_nce's reduction
# ----------------------------------------------------------------------------------------------------------------

KWARGS = ("where", "weights", "reduction", "axis")
ROW = re.compile(r"^\| `(\w+)` \| (yes|no) \| (yes|no) \| (yes|no) \| (yes|no) \|$", re.M)


def test_the_docs_table_lists_every_loss_with_its_keyword_arguments():
    text = (REPO_ROOT / "docs" / "losses.md").read_text()
    table = {name: tuple(v == "yes" for v in flags) for name, *flags in ROW.findall(text)}
    exports = {n for n in losses.__all__ if inspect.isfunction(getattr(losses, n))}
    helpers = exports - set(table)
    # every export that takes none of the keywords is named in the docs as a building block, not a loss
    for name in helpers:
        params = inspect.signature(getattr(losses, name)).parameters
        assert not {"where", "axis"} & set(params) or name in ("reduce_loss", "sum_and_count"), name
        assert f"`{name}`" in text, f"{name} is neither in the table nor named as a building block"
    assert set(table) <= exports
    for name, flags in table.items():
        fn = getattr(losses, name)
        params = inspect.signature(fn).parameters
        assert tuple(k in params for k in KWARGS) == flags, name
        if flags[:3] == (True, False, False):  # batch-relational: the docstring says so
            assert "``where`` only" in fn.__doc__, name


def _np_log_softmax(x, axis):
    x = np.float64(x) - np.max(x, axis=axis, keepdims=True)
    return x - np.log(np.sum(np.exp(x), axis=axis, keepdims=True))


def test_axis_against_a_float64_reference_on_nchw_logits(rng):
    s, t = (
        (rng.normal(size=(3, 5, 2, 4)) * 3).astype(np.float32),
        (rng.normal(size=(3, 5, 2, 4)) * 3).astype(np.float32),
    )
    y = rng.integers(0, 5, size=(3, 2, 4))
    log_q, log_p = _np_log_softmax(s / 2.0, 1), _np_log_softmax(t / 2.0, 1)
    kd = 4.0 * np.sum(np.exp(log_p) * (log_p - log_q), axis=1)  # (3, 2, 4)
    got = np.asarray(losses.kd_kl(s, t, 2.0, axis=1, reduction="none"))
    np.testing.assert_allclose(got, kd, rtol=1e-5, atol=1e-7)
    ce = -np.take_along_axis(_np_log_softmax(s, 1), y[:, None], axis=1)[:, 0]
    np.testing.assert_allclose(np.asarray(losses.cross_entropy(s, y, axis=-3, reduction="none")), ce, rtol=1e-5)
    with pytest.raises(ValueError, match=r"kd_kl: axis=4 is out of range for student_logits of shape \(3, 5, 2, 4\)"):
        losses.kd_kl(s, t, axis=4)


def _axis_calls(s, t, y, soft, lam, axis):
    """Each loss with an `axis`, as a function of (where, weights, reduction)."""
    return {
        "kd_kl": lambda **kw: losses.kd_kl(s, t, 3.0, axis=axis, **kw),
        "cross_entropy": lambda **kw: losses.cross_entropy(s, y, 0.1, axis=axis, **kw),
        "cross_entropy_soft": lambda **kw: losses.cross_entropy(s, soft, axis=axis, **kw),
        "dkd": lambda **kw: losses.dkd(s, t, y, 1.0, 2.0, 3.0, axis=axis, **kw),
        "logit_standardized_kd": lambda **kw: losses.logit_standardized_kd(s, t, axis=axis, **kw),
        "feature_kl": lambda **kw: losses.feature_kl(s, t, axis=axis, **kw),
        "mixture_kd": lambda **kw: losses.mixture_kd(s, t, -t, lam, axis=axis, **kw),
        "extended_kd_loss": lambda **kw: losses.extended_kd_loss(s, t, y, None, None, axis=axis, **kw)[0],
    }


def test_axis_equals_moving_the_class_axis_last(rng):
    s, t = (rng.normal(size=(3, 5, 4)) * 2).astype(np.float32), (rng.normal(size=(3, 5, 4)) * 2).astype(np.float32)
    y = rng.integers(0, 5, size=(3, 4))
    soft = np.asarray(jax.nn.softmax(rng.normal(size=(3, 5, 4)), axis=1), np.float32)
    lam = rng.uniform(size=(3, 4)).astype(np.float32)
    where = rng.uniform(size=(3, 4)) > 0.3
    weights = rng.uniform(size=(3, 4)).astype(np.float32)
    moved = _axis_calls(*(np.moveaxis(x, 1, -1) for x in (s, t)), y, np.moveaxis(soft, 1, -1), lam, -1)
    for name, call in _axis_calls(s, t, y, soft, lam, 1).items():
        per = np.asarray(call(reduction="none"))
        assert per.shape == (3, 4), name
        np.testing.assert_allclose(per, np.asarray(moved[name](reduction="none")), rtol=1e-6, err_msg=name)
        got, want = call(where=where, weights=weights), moved[name](where=where, weights=weights)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(float(got), (per * weights * where).sum() / (weights * where).sum(), rtol=1e-5)


def _inputs(rng):
    """Small float32 inputs for every loss of the docs table, rounded to bf16 (so bf16 and float32 see one value)."""
    shapes = {
        "s": (6, 5), "t": (6, 5), "e_s": (6, 4), "e_t": (6, 3), "m_s": (6, 4, 4, 4), "m_t": (6, 4, 4, 4),
        "m2_s": (6, 2, 2, 2), "m2_t": (6, 2, 2, 2), "scores": (6, 4),
    }  # fmt: skip
    raw = {k: rng.normal(size=v) for k, v in shapes.items()}
    raw["scores"] = np.abs(raw["scores"]) + 0.5
    return {k: np.asarray(jnp.asarray(v, jnp.bfloat16), np.float32) for k, v in raw.items()}


def _every_loss(x, y):
    """Every loss of the docs table on the inputs `x` (any one float dtype); `y` integer labels (6,)."""
    s, t, es, et, ms, mt = x["s"], x["t"], x["e_s"], x["e_t"], x["m_s"], x["m_t"]
    return {
        "kd_kl": losses.kd_kl(s, t),
        "cross_entropy": losses.cross_entropy(s, y),
        "dkd": losses.dkd(s, t, y),
        "logit_standardized_kd": losses.logit_standardized_kd(s, t),
        "feature_kl": losses.feature_kl(s, t),
        "mixture_kd": losses.mixture_kd(s, t, t[::-1], 0.3),
        "extended_kd_loss": losses.extended_kd_loss(s, t, y, {"a": [ms]}, {"a": [mt]})[0],
        "segment_mse": losses.segment_mse([ms], [mt]),
        "attention_transfer": losses.attention_transfer(ms, mt),
        "channel_distillation": losses.channel_distillation(ms, mt),
        "triplet_margin": losses.triplet_margin(es, es[::-1], -es),
        "smoothness": losses.smoothness([ms], [mt]),
        "nst": losses.nst(ms, mt),
        "fsp": losses.fsp([ms, x["m2_s"]], [mt, x["m2_t"]]),
        "vid": losses.vid(ms, mt, es[0]),
        "activation_boundary": losses.activation_boundary(ms, mt),
        "factor_transfer": losses.factor_transfer(ms, mt[::-1]),
        "hierarchical_context": losses.hierarchical_context([ms], [mt], (2, 1)),
        "ofd": losses.ofd(ms, mt, -jnp.abs(es[1])),
        "kdsvd": losses.kdsvd([ms, ms], [mt, mt]),
        "crd_nce": losses.crd_nce(x["scores"], 100),
        "pkt": losses.pkt(es, et),
        "rkd": losses.rkd(es, et),
        "rkd_distance": losses.rkd_distance(es, et),
        "rkd_angle": losses.rkd_angle(es, et),
        "similarity_preserving": losses.similarity_preserving(es, et),
        "correlation_congruence": losses.correlation_congruence(es, et),
        "dist": losses.dist(s, t),
        "mlkd": losses.mlkd(s, t),
    }


def test_every_loss_computes_and_returns_float32_from_bf16(rng):
    """bf16 in, float32 out (optax would return bf16), and the value is the float32 loss of the bf16 inputs."""
    x = _inputs(rng)
    y = rng.integers(0, 5, size=6)
    table = set(ROW.findall((REPO_ROOT / "docs" / "losses.md").read_text()))
    low = _every_loss({k: jnp.asarray(v, jnp.bfloat16) for k, v in x.items()}, y)
    assert set(low) == {row[0] for row in table}  # every loss of the docs table is checked here
    full = _every_loss(x, y)
    for name, value in low.items():
        assert value.dtype == jnp.float32 and value.shape == (), name
        np.testing.assert_allclose(float(value), float(full[name]), rtol=1e-6, atol=1e-7, err_msg=name)


def test_crd_nce_per_example_where_and_weights(rng):
    p = np.abs(rng.normal(size=(5, 4))) + 0.1
    noise = 3 / 50
    per = -(np.log(p[:, 0] / (p[:, 0] + noise + 1e-7)) + np.log(noise / (p[:, 1:] + noise + 1e-7)).sum(1))
    np.testing.assert_allclose(np.asarray(losses.crd_nce(p, 50, reduction="none")), per, rtol=1e-5)
    np.testing.assert_allclose(float(losses.crd_nce(p, 50)), per.mean(), rtol=1e-5)  # RepDistiller's value
    where, weights = np.array([True, False, True, True, False]), np.array([1.0, 9.0, 2.0, 0.5, 9.0])
    garbage = p.copy()
    garbage[~where] = np.nan
    value, grad = jax.value_and_grad(lambda q: losses.crd_nce(q, 50, where=where, weights=weights))(garbage)
    w = weights * where
    np.testing.assert_allclose(float(value), (per * w).sum() / w.sum(), rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(grad)))
