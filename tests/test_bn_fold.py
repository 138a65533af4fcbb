"""Tests for extkd_jax.models.fold_batchnorm: folded eval-mode outputs equal the original's, BNs are gone.

BN statistics and affine parameters are randomised first (the fresh values mean 0, var 1, scale 1, bias 0 would
make a wrong fold look right).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from extkd_jax.models import create_model, fold_batchnorm, forward_with_segments
from extkd_jax.models.bn_fold import Identity


def count_batchnorms(model: nnx.Module) -> int:
    return sum(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_modules(model))


pytestmark = pytest.mark.accelerator

N = 2
HW = 16


def _randomise_bn(model: nnx.Module, seed: int) -> None:
    """Non-trivial running statistics and affine parameters in every BatchNorm of ``model`` (in place)."""
    key = jax.random.key(seed)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.BatchNorm):
            key, k1, k2, k3, k4 = jax.random.split(key, 5)
            c = m.num_features
            m.mean[...] = 0.5 * jax.random.normal(k1, (c,))
            m.var[...] = jax.random.uniform(k2, (c,), minval=0.3, maxval=2.0)
            m.scale[...] = jax.random.uniform(k3, (c,), minval=0.5, maxval=1.5) * jnp.where(
                jax.random.bernoulli(k4, 0.9, (c,)), 1.0, -1.0
            )
            m.bias[...] = 0.3 * jax.random.normal(k4, (c,))


def _model(name: str, dtype=jnp.float32, **kwargs) -> nnx.Module:
    model = create_model(name, 10, rngs=nnx.Rngs(0), dtype=dtype, **kwargs)
    _randomise_bn(model, 1)
    return model


def _x(seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (N, HW, HW, 3), jnp.float32)


def _assert_close(got, want, rtol, atol_rel):
    got = np.asarray(jnp.asarray(got, jnp.float32))
    want = np.asarray(jnp.asarray(want, jnp.float32))
    assert got.shape == want.shape
    scale = max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol_rel * scale)


def _count_eqns(jaxpr) -> int:
    """Equations in a jaxpr, counting those inside nested (pjit, custom_jvp, ...) jaxprs."""
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _count_eqns(inner)
    return total


def _state_leaves(model):
    def host(v):
        return np.asarray(jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v)

    return [host(v) for v in jax.tree.leaves(nnx.state(model))]


# (name, model kwargs, expected BatchNorms left after folding)
CASES = [
    ("resnet8", {}, 0),  # stem + 3 blocks (two with projection shortcuts): all 9 BNs fold
    ("vgg8", {}, 0),  # conv(+bias) -> BN in every layer
    ("wrn_16_2", {}, 7),  # 6 blocks x (bn1 kept, bn2 folded into conv1) + final bn kept
]


@pytest.mark.parametrize("name,kwargs,bn_left", CASES, ids=[c[0] for c in CASES])
def test_fold_matches_eval_outputs_and_segments(name, kwargs, bn_left):
    model = _model(name, **kwargs)
    x = _x()
    before = _state_leaves(model)
    bn_before = count_batchnorms(model)
    want_logits, want_segs = forward_with_segments(model, x, train=False)

    folded = fold_batchnorm(model)
    assert folded is not model
    assert count_batchnorms(folded) == bn_left < bn_before
    assert sum(isinstance(m, Identity) for _, m in nnx.iter_modules(folded)) == bn_before - bn_left

    logits, segs = forward_with_segments(folded, x, train=False)
    assert logits.dtype == jnp.float32
    _assert_close(logits, want_logits, rtol=1e-5, atol_rel=1e-5)
    assert len(segs) == len(want_segs) == len(model.segment_names)
    for got, want in zip(segs, want_segs):
        assert got.dtype == want.dtype
        _assert_close(got, want, rtol=1e-5, atol_rel=1e-5)

    # the original is untouched: same structure, same values, same outputs
    assert count_batchnorms(model) == bn_before
    after = _state_leaves(model)
    assert len(after) == len(before) and all(np.array_equal(a, b) for a, b in zip(after, before))
    again, _ = forward_with_segments(model, x, train=False)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(want_logits))

    # folded parameters stay float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(folded, nnx.Param)))


def test_resnet_fold_under_jit_with_split_merge_and_fewer_ops():
    model = _model("resnet8")
    folded = fold_batchnorm(model)
    x = _x(1)
    want_logits, want_segs = forward_with_segments(model, x, train=False)

    graphdef, params, rest = nnx.split(folded, nnx.Param, ...)

    def run(params, rest, x):
        m = nnx.merge(graphdef, params, rest)
        return forward_with_segments(m, x, train=False)

    logits, segs = jax.jit(run)(params, rest, x)
    _assert_close(logits, want_logits, rtol=1e-5, atol_rel=1e-5)
    for got, want in zip(segs, want_segs):
        _assert_close(got, want, rtol=1e-5, atol_rel=1e-5)

    # the folded model is a frozen teacher: its whole state passes through jit unchanged
    assert not jax.tree.leaves(nnx.state(folded, nnx.BatchStat))

    def n_ops(m):
        g, s = nnx.split(m)
        return _count_eqns(
            jax.make_jaxpr(lambda s, x: forward_with_segments(nnx.merge(g, s), x, train=False)[0])(s, x).jaxpr
        )

    assert n_ops(folded) < n_ops(model)


def test_bf16_folded_close_to_f32_unfolded():
    ref = _model("resnet8", dtype=jnp.float32)
    bf16 = _model("resnet8", dtype=jnp.bfloat16)  # same seeds -> same float32 parameters and statistics
    x = _x(2)
    want_logits, want_segs = forward_with_segments(ref, x, train=False)
    folded = fold_batchnorm(bf16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(folded, nnx.Param)))
    logits, segs = forward_with_segments(folded, x, train=False)
    assert logits.dtype == jnp.float32
    _assert_close(logits, want_logits, rtol=5e-2, atol_rel=5e-2)
    for got, want in zip(segs, want_segs):
        assert got.dtype == jnp.bfloat16
        _assert_close(got, want, rtol=5e-2, atol_rel=5e-2)


def test_mlp_without_batchnorm_is_an_equal_copy():
    model = create_model("mlp", 10, rngs=nnx.Rngs(0), hidden_sizes=(8,), input_size=HW * HW * 3)
    x = _x(3)
    folded = fold_batchnorm(model)
    assert folded is not model and count_batchnorms(folded) == 0
    want, want_segs = forward_with_segments(model, x, train=False)
    got, segs = forward_with_segments(folded, x, train=False)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(segs[0]), np.asarray(want_segs[0]))
