"""Tests for extkd_jax.models: segment shapes, parameter counts, train/eval modes, dtypes, Connector, jit.

Shortcut used by the CIFAR ResNets: projection (option B, 1x1 conv + BN) whenever the stride or the channel
count changes, as RepDistiller. Shape-only checks use nnx.eval_shape so nothing is allocated or compiled.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from extkd_jax.models import Connector, create_model, forward_with_segments, model_names


def count_params(model: nnx.Module) -> int:
    """Elements of the model's nnx.Param variables (works on nnx.eval_shape models)."""
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


N = 2

# Exact counts this implementation gives, with the class count used (10 for the plain ResNets and the MLP, 100 for
# the others, as in the RepDistiller CIFAR-100 tables), and the published figure where there is one.
PARAM_COUNTS = {
    # name: (num_classes, exact, published or None)
    "resnet8": (10, 78_042, None),
    "resnet14": (10, 175_258, None),
    "resnet20": (10, 272_474, 0.27e6),  # He et al. 2016, Table 6
    "resnet32": (10, 466_906, 0.46e6),
    "resnet44": (10, 661_338, 0.66e6),
    "resnet56": (10, 855_770, 0.85e6),
    "resnet110": (10, 1_730_714, 1.7e6),
    "resnet8x4": (100, 1_233_540, 1.23e6),  # RepDistiller (Tian et al. 2020)
    "resnet32x4": (100, 7_433_860, 7.43e6),
    "wrn_16_2": (100, 703_284, 0.70e6),
    "wrn_40_1": (100, 569_780, 0.57e6),
    "wrn_40_2": (100, 2_255_156, 2.26e6),
    "vgg8": (100, 3_965_028, 3.96e6),
    "vgg13": (100, 9_462_180, 9.46e6),
    "mlp": (10, 2_395_210, 784 * 1200 + 1200 + 1200 * 1200 + 1200 + 1200 * 10 + 10),  # Hinton et al. 2015
}


def _abstract_forward(name, num_classes, x_shape, **kwargs):
    """(logits, segments) as ShapeDtypeStructs, without allocating or compiling anything."""

    def run():
        model = create_model(name, num_classes, rngs=nnx.Rngs(0), **kwargs)
        return forward_with_segments(model, jnp.zeros(x_shape), train=False)

    return nnx.eval_shape(run)


@pytest.fixture(scope="module")
def resnet20():
    return create_model("resnet20", 10, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def images():
    return jax.random.normal(jax.random.key(1), (N, 32, 32, 3))


def test_model_names_complete():
    assert set(model_names()) >= set(PARAM_COUNTS)


def test_resnet20_segments_and_logits(resnet20, images):
    assert resnet20.segment_names == ("stage1", "stage2", "stage3")
    logits, segs = forward_with_segments(resnet20, images, train=False)
    assert logits.shape == (N, 10) and logits.dtype == jnp.float32
    assert [s.shape for s in segs] == [(N, 32, 32, 16), (N, 16, 16, 32), (N, 8, 8, 64)]
    assert bool(jnp.all(jnp.isfinite(logits)))
    # Same logits as a plain call of an eval view (a plain call of the model itself is in train mode).
    np.testing.assert_allclose(nnx.view(resnet20, use_running_average=True)(images), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.accelerator
def test_plain_call_sows_nothing(resnet20, images):
    nnx.view(resnet20, use_running_average=True)(images)
    assert not jax.tree.leaves(nnx.state(resnet20, nnx.Intermediate))


@pytest.mark.parametrize(
    "name, num_classes, x_shape, kwargs, expected",
    [
        ("resnet8x4", 100, (N, 32, 32, 3), {}, [(N, 32, 32, 64), (N, 16, 16, 128), (N, 8, 8, 256)]),
        ("wrn_16_2", 100, (N, 32, 32, 3), {}, [(N, 32, 32, 32), (N, 16, 16, 64), (N, 8, 8, 128)]),
        (
            "vgg8",
            100,
            (N, 32, 32, 3),
            {},
            [(N, 32, 32, 64), (N, 16, 16, 128), (N, 8, 8, 256), (N, 4, 4, 512), (N, 4, 4, 512)],
        ),
        ("mlp", 10, (N, 28, 28, 1), {}, [(N, 1200), (N, 1200)]),
        ("mlp", 10, (N, 28, 28, 1), {"hidden_sizes": (30, 20, 10)}, [(N, 30), (N, 20), (N, 10)]),
    ],
)
def test_family_segment_shapes(name, num_classes, x_shape, kwargs, expected):
    logits, segs = _abstract_forward(name, num_classes, x_shape, **kwargs)
    assert logits.shape == (N, num_classes) and logits.dtype == jnp.float32
    assert [s.shape for s in segs] == expected


@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_param_counts(name):
    num_classes, exact, published = PARAM_COUNTS[name]
    model = nnx.eval_shape(lambda: create_model(name, num_classes, rngs=nnx.Rngs(0)))
    n = count_params(model)
    assert n == exact
    if published is not None:
        assert abs(n - published) / published < 0.05
    # Parameters are float32 whatever the compute dtype.
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}


def test_unknown_name_lists_known():
    with pytest.raises(ValueError) as err:
        create_model("resnet9000", 10, rngs=nnx.Rngs(0))
    for name in model_names():
        assert name in str(err.value)


def test_mlp_wrong_input_size():
    model = create_model("mlp", 10, rngs=nnx.Rngs(0), hidden_sizes=(8,))
    with pytest.raises(ValueError, match="input_size=784"):
        model(jnp.zeros((N, 5, 5, 1)))


def _bn_stats(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]


@pytest.mark.accelerator
def test_batchnorm_stats_update_only_in_train():
    model = create_model("resnet8", 10, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (N, 8, 8, 3))
    before = _bn_stats(model)
    forward_with_segments(model, x, train=False)
    for a, b in zip(before, _bn_stats(model)):
        np.testing.assert_array_equal(a, b)
    forward_with_segments(model, x, train=True)
    after = _bn_stats(model)
    assert all(not np.array_equal(a, b) for a, b in zip(before, after))
    # The original model's mode flags are untouched by the views.
    assert model.bn1.use_running_average is True  # built in inference mode: a plain call never trains


def test_dropout_train_vs_eval():
    model = create_model(
        "mlp", 5, rngs=nnx.Rngs(0), hidden_sizes=(16, 16), dropout=0.5, input_dropout=0.2, input_size=12
    )
    x = jax.random.normal(jax.random.key(3), (N, 3, 4, 1))
    a, _ = forward_with_segments(model, x, train=True, rngs=nnx.Rngs(dropout=1))
    a2, _ = forward_with_segments(model, x, train=True, rngs=nnx.Rngs(dropout=1))
    b, _ = forward_with_segments(model, x, train=True, rngs=nnx.Rngs(dropout=2))
    np.testing.assert_array_equal(a, a2)
    assert not np.allclose(a, b)
    # Without rngs the constructor's streams are used (and advance).
    c1, _ = forward_with_segments(model, x, train=True)
    c2, _ = forward_with_segments(model, x, train=True)
    assert not np.allclose(c1, c2)
    # Eval: no dropout, deterministic, equal to an all-deterministic plain call.
    e1, _ = forward_with_segments(model, x, train=False, rngs=nnx.Rngs(dropout=1))
    e2, _ = forward_with_segments(model, x, train=False, rngs=nnx.Rngs(dropout=2))
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_array_equal(e1, nnx.view(model, deterministic=True)(x))
    assert not np.allclose(a, e1)


@pytest.mark.accelerator
def test_bfloat16_compute():
    model = create_model("resnet8", 10, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    logits, segs = forward_with_segments(model, jnp.ones((N, 8, 8, 3)), train=True)
    assert logits.dtype == jnp.float32
    assert all(s.dtype == jnp.bfloat16 for s in segs)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat))} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize(
    "student, teacher, kind, n_params",
    [
        ((4, 4, 8), (4, 4, 8), "identity", 0),
        ((6,), (10,), "linear", 6 * 10 + 10),
        ((4, 4, 8), (4, 4, 16), "conv1x1", 8 * 16 + 2 * 16),
        ((8, 8, 4), (4, 4, 16), "strided_conv", 2 * 2 * 4 * 16 + 2 * 16),
        ((2, 2, 4), (8, 8, 16), "transposed_conv", 4 * 4 * 4 * 16 + 2 * 16),
    ],
)
def test_connector_shapes(student, teacher, kind, n_params):
    conn = Connector(student, teacher, rngs=nnx.Rngs(0))
    assert conn.kind == kind
    assert count_params(conn) == n_params
    x = jax.random.normal(jax.random.key(4), (N, *student))
    y = conn(x)
    assert y.shape == (N, *teacher)
    if conn.bn is not None:
        stats = _bn_stats(conn)
        nnx.view(conn, use_running_average=True)(x)
        for a, b in zip(stats, _bn_stats(conn)):
            np.testing.assert_array_equal(a, b)
        nnx.view(conn, use_running_average=False)(x)
        assert not all(np.array_equal(a, b) for a, b in zip(stats, _bn_stats(conn)))


@pytest.mark.parametrize(
    "student, teacher",
    [((6, 6, 4), (4, 4, 4)), ((8, 8, 4), (4, 2, 4)), ((8, 8, 4), (64,)), ((4, 4), (4, 8))],
)
def test_connector_rejects(student, teacher):
    with pytest.raises(ValueError) as err:
        Connector(student, teacher, rngs=nnx.Rngs(0))
    assert str(tuple(student)) in str(err.value) and str(tuple(teacher)) in str(err.value)


@pytest.mark.accelerator
def test_forward_under_jit_with_split_merge():
    model = create_model("resnet8", 10, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(5), (N, 8, 8, 3))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step(params, rest, x):
        m = nnx.merge(graphdef, params, rest)
        logits, segs = forward_with_segments(m, x, train=True)
        return logits, segs, nnx.state(m, nnx.BatchStat)

    logits, segs, new_stats = step(params, rest, x)
    assert logits.shape == (N, 10) and logits.dtype == jnp.float32
    assert [s.shape for s in segs] == [(N, 8, 8, 16), (N, 4, 4, 32), (N, 2, 2, 64)]
    eager_logits, _ = forward_with_segments(model, x, train=True)
    np.testing.assert_allclose(logits, eager_logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.tree.leaves(new_stats), _bn_stats(model)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
