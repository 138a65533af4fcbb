"""Segments as nested pytrees: paths, the forms of the segment weights, parts independent of the weights' container,
errors naming the paths, and a real Linen model's sown intermediates going straight into the losses (float64 NumPy
references throughout)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from extkd_jax import losses
from tests.test_losses import ref_ce, ref_kd


@pytest.fixture
def rng():
    return np.random.default_rng(11)


def _arr(rng, *shape):
    return rng.normal(size=shape).astype(np.float32)


def _nested(rng):
    """Linen's intermediates shape: a dict of modules, each a dict of sown names, each a tuple of arrays."""
    return {
        "intermediates": {
            "block1": {"seg": (_arr(rng, 4, 3),)},
            "block2": {"seg": (_arr(rng, 4, 2, 2), _arr(rng, 4, 5))},
        }
    }


PATHS = ["intermediates/block1/seg/0", "intermediates/block2/seg/0", "intermediates/block2/seg/1"]


def _leaves(tree):
    """The arrays in path order, flattened by hand (no jax), as the float64 reference pairs them."""
    block1, block2 = tree["intermediates"]["block1"]["seg"], tree["intermediates"]["block2"]["seg"]
    return [np.float64(block1[0]), np.float64(block2[0]), np.float64(block2[1])]


def _ref(student, teacher, ws):
    """Batch mean of sum_k w_k * mean over the example's elements of (s_k - t_k)^2, in float64."""
    per = [((s - t) ** 2).reshape(len(s), -1).mean(1) for s, t in zip(_leaves(student), _leaves(teacher))]
    return float(np.mean(sum(w * p for w, p in zip(ws, per))))


def test_nested_segments_match_the_float64_reference(rng):
    s, t = _nested(rng), _nested(rng)
    np.testing.assert_allclose(float(losses.segment_mse(s, t)), _ref(s, t, [1, 1, 1]), rtol=1e-5)
    # the same arrays as a flat list in path order give the same value
    flat_s, flat_t = [np.float32(x) for x in _leaves(s)], [np.float32(x) for x in _leaves(t)]
    np.testing.assert_allclose(float(losses.segment_mse(s, t)), float(losses.segment_mse(flat_s, flat_t)), rtol=1e-6)
    # lists and tuples on either side pair by index
    t_lists = jax.tree_util.tree_map(lambda x: x, t)
    t_lists["intermediates"]["block2"]["seg"] = list(t_lists["intermediates"]["block2"]["seg"])
    np.testing.assert_allclose(float(losses.segment_mse(s, t_lists)), _ref(s, t, [1, 1, 1]), rtol=1e-5)


@pytest.mark.parametrize(
    "weights",
    [
        {"intermediates": {"block1": {"seg": (2.0,)}, "block2": {"seg": (0.5, 3.0)}}},  # the segments' own shape
        {f"{p}": w for p, w in zip(PATHS, (2.0, 0.5, 3.0))},  # flat, keyed by path strings
        {"intermediates/block1": 2.0, "intermediates/block2/seg/0": 0.5, "intermediates/block2/seg/1": 3.0},
        {"intermediates": {"block1": 2.0, "block2": 0.5}, "intermediates/block2/seg/1": 3.0},  # longest path wins
        [2.0, 0.5, 3.0],  # flattened order
        jnp.array([2.0, 0.5, 3.0]),
    ],
    ids=["pytree", "path-strings", "prefix-strings", "prefix-pytree-and-override", "list", "array"],
)
def test_every_form_of_segment_weights(rng, weights):
    s, t = _nested(rng), _nested(rng)
    got = float(losses.segment_mse(s, t, weights))
    np.testing.assert_allclose(got, _ref(s, t, [2.0, 0.5, 3.0]), rtol=1e-5)


def test_one_weight_per_top_level_entry_of_a_list(rng):
    s = [{"a": _arr(rng, 4, 3), "b": _arr(rng, 4, 2)}, _arr(rng, 4, 6)]
    t = [{"a": _arr(rng, 4, 3), "b": _arr(rng, 4, 2)}, _arr(rng, 4, 6)]

    def mse(a, b):
        return np.mean((np.float64(a) - np.float64(b)) ** 2)

    want = 2.0 * (mse(s[0]["a"], t[0]["a"]) + mse(s[0]["b"], t[0]["b"])) + 5.0 * mse(s[1], t[1])
    np.testing.assert_allclose(float(losses.segment_mse(s, t, [2.0, 5.0])), want, rtol=1e-5)


@pytest.mark.parametrize("form", ["scalar", "list", "array", "dict", "jax-scalars"])
def test_parts_do_not_depend_on_the_weights_container(rng, form):
    """The same weight 2.0 on every segment, in five containers: identical parts and total; `segment` unweighted."""
    logits_s, logits_t = _arr(rng, 4, 6), _arr(rng, 4, 6)
    y = rng.integers(0, 6, 4)
    s, t = {"a": _arr(rng, 4, 3), "b": _arr(rng, 4, 5)}, {"a": _arr(rng, 4, 3), "b": _arr(rng, 4, 5)}
    weight = {
        "scalar": 2.0,
        "list": [2.0, 2.0],
        "array": jnp.array([2.0, 2.0]),
        "dict": {"a": 2.0, "b": 2.0},
        "jax-scalars": {"a": jnp.float32(2.0), "b": jnp.float32(2.0)},
    }[form]
    total, parts = losses.extended_kd_loss(logits_s, logits_t, y, s, t, segment_weight=weight)
    segment = sum(np.mean((np.float64(s[k]) - np.float64(t[k])) ** 2) for k in ("a", "b"))
    np.testing.assert_allclose(float(parts["segment"]), segment, rtol=1e-5)
    np.testing.assert_allclose(float(parts["kd"]), ref_kd(logits_s, logits_t, 4.0), rtol=1e-5)
    np.testing.assert_allclose(float(parts["ce"]), ref_ce(logits_s, y), rtol=1e-5)
    np.testing.assert_allclose(float(total), float(parts["ce"] + parts["kd"]) + 2.0 * segment, rtol=1e-5)


def test_unequal_weights_weigh_the_total_not_the_part(rng):
    logits = _arr(rng, 4, 6)
    s, t = _nested(rng), _nested(rng)
    total, parts = losses.extended_kd_loss(logits, logits, None, s, t, segment_weight=[2.0, 0.5, 3.0])
    np.testing.assert_allclose(float(parts["segment"]), _ref(s, t, [1, 1, 1]), rtol=1e-5)
    np.testing.assert_allclose(float(total), _ref(s, t, [2.0, 0.5, 3.0]), rtol=1e-5)  # kd of identical logits is 0


def test_path_errors_name_the_paths(rng):
    s, t = _nested(rng), _nested(rng)
    extra = jax.tree_util.tree_map(lambda x: x, s)
    extra["intermediates"]["block3"] = {"seg": (_arr(rng, 4, 3),)}
    with pytest.raises(ValueError, match=r"only in student_segments \['intermediates/block3/seg/0'\], only in teach"):
        losses.segment_mse(extra, t)
    with pytest.raises(ValueError, match=r"extended_kd_loss: segment keys differ.*only in teacher_segments \['inter"):
        losses.extended_kd_loss(_arr(rng, 4, 3), _arr(rng, 4, 3), None, t, extra)
    bad = jax.tree_util.tree_map(lambda x: x, t)
    bad["intermediates"]["block2"]["seg"] = (_arr(rng, 4, 2, 2), _arr(rng, 4, 6))
    with pytest.raises(ValueError, match=r"segment 'intermediates/block2/seg/1': student shape \(4, 5\) != teacher"):
        losses.segment_mse(s, bad)
    with pytest.raises(ValueError, match=r"no weight for \['intermediates/block2/seg/0', 'intermediates/block2/seg"):
        losses.segment_mse(s, t, {"intermediates/block1": 1.0})
    with pytest.raises(ValueError, match=r"no segment under \['intermediates/block9'\]"):
        losses.segment_mse(s, t, {"intermediates": 1.0, "intermediates/block9": 2.0})
    with pytest.raises(ValueError, match=r"segment_weight for segment 'intermediates/block2/seg/1' must be >= 0"):
        losses.extended_kd_loss(_arr(rng, 4, 3), _arr(rng, 4, 3), None, s, t, segment_weight=[1.0, 1.0, -1.0])
    with pytest.raises(ValueError, match=r"segment_weights has 2 entries for 3 segments"):
        losses.segment_mse(s, t, [1.0, 2.0])
    with pytest.raises(ValueError, match=r"two segments at path 'a/b'"):
        losses.segment_mse({"a/b": s["intermediates"]["block1"]["seg"][0], "a": {"b": _arr(rng, 4, 3)}}, t)
    with pytest.raises(ValueError, match=r"segment_mse: student_segments at 'a' must be an array, got str"):
        losses.segment_mse({"a": "x"}, {"a": "x"})
    with pytest.raises(ValueError, match=r"wrap a single array in a list"):
        losses.segment_mse(_arr(rng, 4, 3), _arr(rng, 4, 3))


def test_nested_segments_under_jit_with_traced_weights(rng):
    s, t = _nested(rng), _nested(rng)
    weights = {"intermediates": {"block1": 2.0, "block2": 0.5}}
    got = jax.jit(losses.segment_mse)(s, t, weights)
    np.testing.assert_allclose(float(got), _ref(s, t, [2.0, 0.5, 0.5]), rtol=1e-5)


class _Block(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.features)(x))
        self.sow("intermediates", "seg", x)
        return x


class _Net(nn.Module):
    """Two submodules that sow their outputs, and a head: the shape Linen users distil from."""

    @nn.compact
    def __call__(self, x):
        x = _Block(8, name="block1")(x)
        x = _Block(6, name="block2")(x)
        return nn.Dense(5, name="head")(x)


def test_linen_intermediates_go_straight_into_the_losses(rng):
    net = _Net()
    x = jnp.asarray(_arr(rng, 4, 7))
    y = rng.integers(0, 5, 4)
    s_vars = net.init(jax.random.key(0), x)
    t_vars = net.init(jax.random.key(1), x)
    t_logits, t_state = net.apply(t_vars, x, mutable=["intermediates"])
    assert set(t_state["intermediates"]) == {"block1", "block2"}

    def loss(params):
        s_logits, s_state = net.apply({"params": params}, x, mutable=["intermediates"])
        total, parts = losses.extended_kd_loss(
            s_logits, t_logits, y, s_state, t_state, segment_weight={"intermediates/block2": 3.0, "intermediates": 1.0}
        )
        return total, (parts, s_logits, s_state, losses.segment_mse(s_state, t_state))

    (total, (parts, s_logits, s_state, seg)), grads = jax.value_and_grad(loss, has_aux=True)(s_vars["params"])

    def mse(block):
        a = np.float64(s_state["intermediates"][block]["seg"][0])
        return np.mean((a - np.float64(t_state["intermediates"][block]["seg"][0])) ** 2)

    np.testing.assert_allclose(float(seg), mse("block1") + mse("block2"), rtol=1e-5)
    np.testing.assert_allclose(float(parts["segment"]), mse("block1") + mse("block2"), rtol=1e-5)
    want = ref_ce(np.asarray(s_logits), y) + ref_kd(np.asarray(s_logits), np.asarray(t_logits), 4.0)
    np.testing.assert_allclose(float(total), want + mse("block1") + 3.0 * mse("block2"), rtol=1e-5)
    # the segment term trains both blocks
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree_util.tree_leaves(grads["block1"]))
