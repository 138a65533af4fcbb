"""extkd_jax.losses against independent NumPy float64 references, finite differences and edge cases."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from extkd_jax.losses import attention_transfer, cross_entropy, dkd, extended_kd_loss, kd_kl, segment_mse

pytestmark = pytest.mark.accelerator  # float32 losses of bf16 inputs, extreme logits: on any backend

RTOL = 1e-5

# ----------------------------------------------------------------------------------------------------------------
# NumPy float64 references (written from the papers' formulas, not from the implementation)
# ----------------------------------------------------------------------------------------------------------------


def np_softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def ref_kd(s, t, T, w=None):
    p = np_softmax(np.asarray(t, np.float64) / T)
    q = np_softmax(np.asarray(s, np.float64) / T)
    kl = T * T * np.sum(p * (np.log(p) - np.log(q)), axis=-1)
    if w is None:
        return kl.mean()
    w = np.asarray(w, np.float64)
    return np.sum(w * kl) / np.sum(w)


def ref_ce(logits, labels, eps=0.0):
    p = np_softmax(logits)
    c = p.shape[-1]
    target = (1 - eps) * np.eye(c)[labels] + eps / c
    return np.mean(-np.sum(target * np.log(p), axis=-1))


def ref_seg(ss, ts, ws=None):
    ws = [1.0] * len(ss) if ws is None else ws
    return sum(w * np.mean((np.asarray(s, np.float64) - np.asarray(t, np.float64)) ** 2) for s, t, w in zip(ss, ts, ws))


def ref_at(ss, ts, p=2):
    def amap(f):
        a = (np.abs(np.asarray(f, np.float64)) ** p).mean(axis=-1).reshape(f.shape[0], -1)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    return sum(np.mean((amap(s) - amap(t)) ** 2) for s, t in zip(ss, ts))


def ref_dkd(s, t, y, alpha, beta, T):
    """mdistiller's DKD, literally (its '- 1000 * gt_mask' excludes the target exactly in float64 here)."""
    s = np.asarray(s, np.float64)
    t = np.asarray(t, np.float64)
    n, c = s.shape
    gt = np.eye(c)[y]
    ps, pt = np_softmax(s / T), np_softmax(t / T)
    bs = np.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], axis=1)
    bt = np.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], axis=1)
    tckd = np.sum(bt * (np.log(bt) - np.log(bs))) * T**2 / n
    pt2 = np_softmax(t / T - 1000.0 * gt)
    ps2 = np_softmax(s / T - 1000.0 * gt)
    terms = np.where(gt > 0, 0.0, pt2 * (np.log(np.where(gt > 0, 1.0, pt2)) - np.log(np.where(gt > 0, 1.0, ps2))))
    nckd = terms.sum() * T**2 / n
    return alpha * tckd + beta * nckd


def fd_grad(f, x, h=1e-5):
    """Central finite differences of a float64 NumPy function."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        g[idx] = (f(xp) - f(xm)) / (2 * h)
    return g


def assert_grad_close(g_jax, g_fd):
    g_jax = np.asarray(g_jax, np.float64)
    scale = max(1.0, float(np.abs(g_fd).max()))
    np.testing.assert_allclose(g_jax, g_fd, rtol=1e-3, atol=1e-4 * scale)


def rel_close(a, b, rtol=RTOL):
    a = float(a)
    assert abs(a - b) <= rtol * max(abs(b), 1e-12), (a, b)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def logits_pair(rng, n=4, c=5, scale=2.0):
    s = (scale * rng.standard_normal((n, c))).astype(np.float32)
    t = (scale * rng.standard_normal((n, c))).astype(np.float32)
    y = rng.integers(0, c, size=n).astype(np.int32)
    return s, t, y


# ----------------------------------------------------------------------------------------------------------------
# values against references
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_kl_matches_reference(rng, T):
    s, t, _ = logits_pair(rng)
    rel_close(kd_kl(s, t, T), ref_kd(s, t, T))


def test_kd_kl_weighted_mean(rng):
    s, t, _ = logits_pair(rng)
    w = np.array([0.5, 0.0, 2.0, 1.0], np.float32)
    rel_close(kd_kl(s, t, 2.0, weights=w), ref_kd(s, t, 2.0, w))
    # all-zero weights: 0, with a finite gradient
    zero = np.zeros(4, np.float32)
    assert float(kd_kl(s, t, weights=zero)) == 0.0
    assert np.all(np.isfinite(jax.grad(lambda x: kd_kl(x, t, weights=zero))(s)))


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_matches_reference(rng, eps):
    s, _, y = logits_pair(rng)
    rel_close(cross_entropy(s, y, eps), ref_ce(s, y, eps))


def test_segment_mse_matches_reference(rng):
    ss = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((3, 2, 2, 2)).astype(np.float32)]
    ts = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((3, 2, 2, 2)).astype(np.float32)]
    rel_close(segment_mse(ss, ts), ref_seg(ss, ts))
    rel_close(segment_mse(ss, ts, 0.5), ref_seg(ss, ts, [0.5, 0.5]))
    rel_close(segment_mse(ss, ts, [0.25, 3.0]), ref_seg(ss, ts, [0.25, 3.0]))
    rel_close(segment_mse(tuple(ss), tuple(ts), jnp.array([0.25, 3.0])), ref_seg(ss, ts, [0.25, 3.0]))


def test_segment_mse_dict_order_and_weights(rng):
    a_s, a_t = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    b_s, b_t = rng.standard_normal((2, 5)), rng.standard_normal((2, 5))
    student = {"b": b_s, "a": a_s}
    teacher = {"a": a_t, "b": b_t}
    want = ref_seg([a_s, b_s], [a_t, b_t], [2.0, 0.5])
    rel_close(segment_mse(student, teacher, {"a": 2.0, "b": 0.5}), want)
    # a weight sequence follows sorted key order: ("a", "b")
    rel_close(segment_mse(student, teacher, [2.0, 0.5]), want)


@pytest.mark.parametrize("p", [2, 1.5])
def test_attention_transfer_matches_reference(rng, p):
    ss = [rng.standard_normal((2, 4, 4, 3)).astype(np.float32), rng.standard_normal((2, 2, 2, 5)).astype(np.float32)]
    ts = [rng.standard_normal((2, 4, 4, 6)).astype(np.float32), rng.standard_normal((2, 2, 2, 1)).astype(np.float32)]
    rel_close(attention_transfer(ss, ts, p), ref_at(ss, ts, p))
    rel_close(attention_transfer(ss[0], ts[0], p), ref_at(ss[:1], ts[:1], p))


@pytest.mark.parametrize("alpha,beta,T", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_matches_reference(rng, alpha, beta, T):
    s, t, y = logits_pair(rng, n=6, c=7)
    rel_close(dkd(s, t, y, alpha, beta, T), ref_dkd(s, t, y, alpha, beta, T))


def test_dkd_two_classes_has_no_nckd(rng):
    s, t, y = logits_pair(rng, c=2)
    rel_close(dkd(s, t, y, 1.0, 123.0, 2.0), ref_dkd(s, t, y, 1.0, 0.0, 2.0))


def test_extended_kd_loss_parts_and_total(rng):
    s, t, y = logits_pair(rng)
    ss = [rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((4, 6)).astype(np.float32)]
    ts = [rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((4, 6)).astype(np.float32)]
    total, parts = extended_kd_loss(s, t, y, ss, ts, temperature=3.0, ce_weight=0.3, kd_weight=0.7, segment_weight=2.0)
    ce, kd, seg = ref_ce(s, y), ref_kd(s, t, 3.0), ref_seg(ss, ts)
    rel_close(parts["ce"], ce)
    rel_close(parts["kd"], kd)
    rel_close(parts["segment"], seg)
    rel_close(total, 0.3 * ce + 0.7 * kd + 2.0 * seg)

    # per-segment weights: `segment` stays unweighted (like ce and kd), the total carries the weights
    total, parts = extended_kd_loss(s, t, y, ss, ts, segment_weight=[0.5, 4.0])
    rel_close(parts["segment"], seg)
    rel_close(total, ref_ce(s, y) + ref_kd(s, t, 4.0) + ref_seg(ss, ts, [0.5, 4.0]))

    # labels=None drops CE
    total, parts = extended_kd_loss(s, t, None, ss, ts, ce_weight=5.0)
    assert float(parts["ce"]) == 0.0
    rel_close(total, ref_kd(s, t, 4.0) + ref_seg(ss, ts))


# ----------------------------------------------------------------------------------------------------------------
# gradients against finite differences of the float64 references
# ----------------------------------------------------------------------------------------------------------------


def test_gradients_match_finite_differences(rng):
    s, t, y = logits_pair(rng, n=3, c=4)
    assert_grad_close(jax.grad(lambda x: kd_kl(x, t, 2.0))(s), fd_grad(lambda x: ref_kd(x, t, 2.0), s))
    w = np.array([1.0, 0.5, 2.0], np.float32)
    assert_grad_close(jax.grad(lambda x: kd_kl(x, t, 2.0, weights=w))(s), fd_grad(lambda x: ref_kd(x, t, 2.0, w), s))
    assert_grad_close(jax.grad(lambda x: cross_entropy(x, y, 0.1))(s), fd_grad(lambda x: ref_ce(x, y, 0.1), s))
    assert_grad_close(
        jax.grad(lambda x: dkd(x, t, y, 1.0, 8.0, 4.0))(s), fd_grad(lambda x: ref_dkd(x, t, y, 1.0, 8.0, 4.0), s)
    )
    ss, ts = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)
    assert_grad_close(
        jax.grad(lambda x: segment_mse([x], [ts], [1.5]))(ss), fd_grad(lambda x: ref_seg([x], [ts], [1.5]), ss)
    )
    fs, ft = rng.standard_normal((2, 3, 3, 2)).astype(np.float32), rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    assert_grad_close(jax.grad(lambda x: attention_transfer(x, ft))(fs), fd_grad(lambda x: ref_at([x], [ft]), fs))
    assert_grad_close(
        jax.grad(lambda x: extended_kd_loss(x, t, y, [x], [t], ce_weight=0.5, segment_weight=2.0)[0])(s),
        fd_grad(lambda x: 0.5 * ref_ce(x, y) + ref_kd(x, t, 4.0) + 2.0 * ref_seg([x], [t]), s),
    )


def test_teacher_gradient_is_exactly_zero(rng):
    s, t, y = logits_pair(rng)
    grads = [
        jax.grad(lambda x: kd_kl(s, x))(t),
        jax.grad(lambda x: dkd(s, x, y))(t),
        jax.grad(lambda x: segment_mse([s], [x]))(t),
        jax.grad(lambda x: extended_kd_loss(s, x, y, [s], [x])[0])(t),
        jax.grad(lambda x: attention_transfer(s[:, :, None, None], x[:, :, None, None]))(t),
    ]
    for g in grads:
        assert np.all(np.asarray(g) == 0.0)


# ----------------------------------------------------------------------------------------------------------------
# numerical robustness and dtypes
# ----------------------------------------------------------------------------------------------------------------

EXTREME = [
    np.full((2, 4), 1e4, np.float32),
    np.array([[1e4, -1e4, 0.0, 3.0], [-1e4, -1e4, 1e4, 1e4]], np.float32),
    np.array([[-1e4, 1e4, -1e4, -1e4], [1e4, -1e4, -1e4, 0.0]], np.float32),
]


@pytest.mark.parametrize("i", range(len(EXTREME)))
@pytest.mark.parametrize("j", range(len(EXTREME)))
def test_extreme_logits_finite(i, j):
    s, t = jnp.asarray(EXTREME[i]), jnp.asarray(EXTREME[j])
    y = jnp.array([0, 2], jnp.int32)
    fns = [
        lambda a, b: kd_kl(a, b, 1.0),
        lambda a, b: kd_kl(a, b, 4.0),
        lambda a, b: dkd(a, b, y, 1.0, 8.0, 1.0),
        lambda a, b: dkd(a, b, y),
        lambda a, b: cross_entropy(a, y) + cross_entropy(b, y, 0.1),
        lambda a, b: extended_kd_loss(a, b, y, [a], [b])[0],
    ]
    for f in fns:
        v, (gs, gt) = jax.value_and_grad(f, argnums=(0, 1))(s, t)
        assert np.isfinite(float(v))
        assert np.all(np.isfinite(np.asarray(gs))) and np.all(np.isfinite(np.asarray(gt)))


def test_kd_kl_of_identical_logits_is_zero(rng):
    s, _, y = logits_pair(rng)
    for x in [s, EXTREME[1]]:
        assert float(kd_kl(x, x)) == 0.0
        assert abs(float(dkd(x, x, y[: x.shape[0]]))) == 0.0


def test_attention_transfer_zero_features_finite():
    z = jnp.zeros((2, 3, 3, 2))
    v, g = jax.value_and_grad(lambda x: attention_transfer(x, z))(z)
    assert float(v) == 0.0 and np.all(np.isfinite(np.asarray(g)))


def test_bf16_inputs_give_float32_outputs(rng):
    s, t, y = logits_pair(rng)
    sb, tb = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
    fb = jnp.asarray(rng.standard_normal((4, 2, 2, 3)), jnp.bfloat16)
    outs = [
        kd_kl(sb, tb),
        cross_entropy(sb, y),
        dkd(sb, tb, y),
        segment_mse([sb], [tb]),
        attention_transfer(fb, fb * 2),
        *extended_kd_loss(sb, tb, y, [sb], [tb])[1].values(),
        extended_kd_loss(sb, tb, None, [sb], [tb])[0],
    ]
    for o in outs:
        assert o.dtype == jnp.float32 and o.shape == ()
    # the value is the float32 loss of the bf16-rounded inputs
    rel_close(kd_kl(sb, tb), ref_kd(np.asarray(sb, np.float32), np.asarray(tb, np.float32), 4.0))


def test_works_under_jit(rng):
    s, t, y = logits_pair(rng)
    f = jax.jit(lambda a, b, lab, temp: extended_kd_loss(a, b, lab, [a], [b], temperature=temp)[0])
    rel_close(f(s, t, y, 2.0), ref_ce(s, y) + ref_kd(s, t, 2.0) + ref_seg([s], [t]))


# ----------------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [0.0, -1.0, 0])
def test_temperature_must_be_positive(rng, T):
    s, t, y = logits_pair(rng)
    for call in [
        lambda: kd_kl(s, t, T),
        lambda: dkd(s, t, y, temperature=T),
        lambda: extended_kd_loss(s, t, y, [s], [t], temperature=T),
    ]:
        with pytest.raises(ValueError, match=r"temperature must be > 0, got "):
            call()


def test_logit_shape_errors_name_the_argument(rng):
    s, t, y = logits_pair(rng)
    with pytest.raises(ValueError, match=r"kd_kl: student_logits shape \(4, 5\) != teacher_logits shape \(4, 3\)"):
        kd_kl(s, t[:, :3])
    with pytest.raises(ValueError, match=r"kd_kl: student_logits shape \(4, 5\) != teacher_logits shape \(4, 3\)"):
        jax.jit(kd_kl)(s, t[:, :3])
    with pytest.raises(ValueError, match=r"kd_kl: student_logits shape \(4, 5\) != teacher_logits shape \(20,\)"):
        kd_kl(s, t.reshape(-1))
    with pytest.raises(ValueError, match=r"kd_kl: weights shape \(3,\)"):
        kd_kl(s, t, weights=np.ones(3))
    with pytest.raises(ValueError, match=r"kd_kl: weights must be >= 0"):
        kd_kl(s, t, weights=-np.ones(4))
    with pytest.raises(ValueError, match=r"dkd: student_logits shape \(4, 5\) != teacher_logits shape \(3, 5\)"):
        dkd(s, t[:3], y)
    with pytest.raises(ValueError, match=r"dkd: labels shape \(3,\)"):
        dkd(s, t, y[:3])
    with pytest.raises(ValueError, match=r"cross_entropy: labels shape \(4,\) does not match the batch shape \(\)"):
        cross_entropy(s[0], y)
    with pytest.raises(
        ValueError, match=r"cross_entropy: labels of dtype float32 are soft targets and need the logits' shape"
    ):
        cross_entropy(s, y.astype(np.float32))
    with pytest.raises(ValueError, match=r"cross_entropy: labels must lie in \[0, 5\)"):
        cross_entropy(s, np.array([0, 1, 2, 5]))
    for eps in [-0.1, 1.0]:
        with pytest.raises(ValueError, match="label_smoothing"):
            cross_entropy(s, y, eps)
    with pytest.raises(ValueError, match=r"extended_kd_loss|kd_kl"):
        extended_kd_loss(s, t[:, :2], y, [s], [t])


@pytest.mark.parametrize("name", ["ce_weight", "kd_weight", "segment_weight"])
def test_extended_negative_weights_name_the_weight(rng, name):
    s, t, y = logits_pair(rng)
    with pytest.raises(ValueError, match=name):
        extended_kd_loss(s, t, y, [s], [t], **{name: -0.5})
    if name == "segment_weight":
        with pytest.raises(ValueError, match=r"segment_weight for segment 1 must be >= 0"):
            extended_kd_loss(s, t, y, [s, s], [t, t], segment_weight=[1.0, -1.0])


def test_dkd_and_attention_errors(rng):
    s, t, y = logits_pair(rng)
    with pytest.raises(ValueError, match="alpha"):
        dkd(s, t, y, alpha=-1.0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        dkd(s[:, :1], t[:, :1], np.zeros(4, np.int32))
    a, b = np.ones((2, 4, 4, 3), np.float32), np.ones((2, 2, 2, 3), np.float32)
    with pytest.raises(ValueError, match=r"pair 1: student shape \(2, 4, 4, 3\) and teacher shape \(2, 2, 2, 3\)"):
        attention_transfer([a, a], [a, b])
    with pytest.raises(ValueError, match=r"student_feats\[0\] must have at least 4 axes"):
        attention_transfer(a[0], a[0])
    with pytest.raises(ValueError, match="p must be > 0"):
        attention_transfer(a, a, p=0)


def test_segment_mse_errors_name_the_segment():
    x3, x4 = np.ones((2, 3)), np.ones((2, 4))
    cases = [
        (lambda: segment_mse([x3, x3], [x3]), r"2 student segments vs 1 teacher"),
        (lambda: segment_mse([x3, x3], [x3, x4]), r"segment 1: student shape \(2, 3\) != teacher shape \(2, 4\)"),
        (lambda: segment_mse({"a": x3, "b": x3}, {"a": x3, "c": x3}), r"only in student_segments \['b'\].*\['c'\]"),
        (lambda: segment_mse({"a": x3, "b": x3}, {"a": x3, "b": x4}), r"segment 'b': student shape \(2, 3\)"),
        (lambda: segment_mse([], []), r"no segments"),
        (lambda: segment_mse({}, {}), r"no segments"),
        (lambda: segment_mse([x3, x3], [x3, x3], [1.0, -2.0]), r"weights for segment 1 must be >= 0"),
        (lambda: segment_mse({"a": x3}, {"a": x3}, {"a": -1.0}), r"weights for segment 'a' must be >= 0"),
        (lambda: segment_mse([x3], [x3], -1.0), r"weights must be >= 0"),
        (lambda: segment_mse([x3, x3], [x3, x3], [1.0]), r"weights has 1 entries for 2 segments"),
        (lambda: segment_mse({"a": x3}, {"a": x3}, {"b": 1.0}), r"weights keys \['b'\] != segment keys \['a'\]"),
        (lambda: segment_mse([x3], {"a": x3}), r"both must be sequences or both mappings"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            call()


# ----------------------------------------------------------------------------------------------------------------
# import contract
# ----------------------------------------------------------------------------------------------------------------


def test_losses_import_without_flax(repo_root):
    code = (
        "import sys; sys.modules['flax'] = None\n"
        "from extkd_jax.losses import kd_kl, segment_mse, extended_kd_loss, dkd, attention_transfer, cross_entropy\n"
        "import jax.numpy as jnp\n"
        "print(float(kd_kl(jnp.zeros((2, 3)), jnp.zeros((2, 3)))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.0"
