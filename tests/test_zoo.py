"""The KD zoo losses (#15) against float64 NumPy references written from the published formulas (loops where the
library uses matrix products), their gradients against central finite differences of those references, and their
contract: masks, named shape errors, no teacher gradient, extreme inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from extkd_jax import losses
from extkd_jax.losses.zoo import MLKD_TEMPERATURES
from tests.test_losses import fd_grad, np_softmax

RTOL = 2e-5


@pytest.fixture
def rng():
    return np.random.default_rng(15)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _huber(x):
    x = np.abs(x)
    return np.where(x < 1, 0.5 * x * x, x - 0.5)


def ref_pkt(s, t, eps=1e-7):
    s, t = s.reshape(len(s), -1), t.reshape(len(t), -1)

    def conditional(x):
        u = _unit(x)
        n = len(u)
        sim = np.array([[(u[i] @ u[j] + 1) / 2 for j in range(n)] for i in range(n)])
        return sim / sim.sum(1, keepdims=True)

    p_s, p_t = conditional(s), conditional(t)
    return np.mean(p_t * np.log((p_t + eps) / (p_s + eps)))


def ref_rkd(s, t, dw=25.0, aw=50.0):
    """RepDistiller's form: every N x N distance entry and N^3 angle entry averaged, zero difference vectors -> 0."""
    n = len(s)

    def distances(e):
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(n)] for i in range(n)])
        return d / d[d > 0].mean()

    def angles(e):
        a = np.zeros((n, n, n))
        for j in range(n):
            for i in range(n):
                for k in range(n):
                    u, v = e[i] - e[j], e[k] - e[j]
                    if np.linalg.norm(u) > 0 and np.linalg.norm(v) > 0:
                        a[j, i, k] = u @ v / np.linalg.norm(u) / np.linalg.norm(v)
        return a

    return dw * _huber(distances(s) - distances(t)).mean() + aw * _huber(angles(s) - angles(t)).mean()


def ref_sp(s, t):
    n = len(s)
    s, t = s.reshape(n, -1), t.reshape(n, -1)

    def gram(f):
        g = np.array([[f[i] @ f[j] for j in range(n)] for i in range(n)])
        return g / np.sqrt((g**2).sum(1, keepdims=True))

    return ((gram(t) - gram(s)) ** 2).sum() / n**2


def ref_cc(s, t, gamma=0.4):
    n = len(s)

    def corr(f):
        u = _unit(f)
        return np.array([[np.exp(-gamma * np.sum((u[i] - u[j]) ** 2)) for j in range(n)] for i in range(n)])

    return ((corr(t) - corr(s)) ** 2).sum() / n**2


def _pearson(a, b, eps=1e-8):
    a, b = a - a.mean(), b - b.mean()
    return (a @ b) / (np.linalg.norm(a) * np.linalg.norm(b) + eps)


def ref_dist(zs, zt, beta=1.0, gamma=1.0, temp=1.0):
    ps, pt = np_softmax(zs / temp), np_softmax(zt / temp)
    inter = 1 - np.mean([_pearson(ps[i], pt[i]) for i in range(len(ps))])
    intra = 1 - np.mean([_pearson(ps[:, c], pt[:, c]) for c in range(ps.shape[1])])
    return temp**2 * (beta * inter + gamma * intra)


def ref_nst(s, t):
    """Per example (H, W, C) maps: squared MMD, polynomial kernel (x . y)^2 over spatially normalised channels."""
    out = []
    for fs, ft in zip(s, t, strict=True):
        cs = [_unit(fs[..., c].ravel()) for c in range(fs.shape[-1])]
        ct = [_unit(ft[..., c].ravel()) for c in range(ft.shape[-1])]

        def k(a, b):
            return np.mean([(x @ y) ** 2 for x in a for y in b])

        out.append(k(ct, ct) - 2 * k(cs, ct) + k(cs, cs))
    return np.mean(out)


def ref_ls_kd(zs, zt, temp=2.0):
    def z(v):
        return (v - v.mean(-1, keepdims=True)) / (v.std(-1, ddof=1, keepdims=True) + 1e-7)

    ps, pt = np_softmax(z(zs) / temp), np_softmax(z(zt) / temp)
    return temp**2 * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1))


def _cases(rng):
    feat_s, feat_t = rng.normal(size=(6, 5)), rng.normal(size=(6, 7)) * 3  # unequal dimensions
    maps_s, maps_t = rng.normal(size=(3, 4, 4, 5)), rng.normal(size=(3, 4, 4, 6))
    logits_s, logits_t = rng.normal(size=(6, 10)) * 2, rng.normal(size=(6, 10)) * 4
    return {
        "pkt": (losses.pkt, ref_pkt, feat_s, feat_t),
        "rkd": (losses.rkd, ref_rkd, feat_s, rng.normal(size=(6, 5)) * 3),
        "similarity_preserving": (losses.similarity_preserving, ref_sp, rng.normal(size=(6, 2, 2, 3)), feat_t),
        "correlation_congruence": (losses.correlation_congruence, ref_cc, feat_s, feat_t),
        "dist": (losses.dist, ref_dist, logits_s, logits_t),
        "nst": (losses.nst, ref_nst, maps_s, maps_t),
        "logit_standardized_kd": (losses.logit_standardized_kd, ref_ls_kd, logits_s, logits_t),
    }


NAMES = list(_cases(np.random.default_rng(0)))


@pytest.mark.parametrize("name", NAMES)
def test_value_against_numpy(name, rng):
    fn, ref, s, t = _cases(rng)[name]
    got = fn(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), ref(s, t), rtol=RTOL, atol=1e-7)
    assert float(ref(s, t)) > 1e-4  # the case is not a trivial zero


def test_keyword_arguments_against_numpy(rng):
    s, t = rng.normal(size=(5, 8)) * 3, rng.normal(size=(5, 8)) * 5
    np.testing.assert_allclose(
        losses.dist(s, t, beta=2.0, gamma=0.5, temperature=4.0), ref_dist(s, t, 2.0, 0.5, 4.0), rtol=RTOL
    )
    np.testing.assert_allclose(losses.logit_standardized_kd(s, t, 4.0), ref_ls_kd(s, t, 4.0), rtol=RTOL)
    np.testing.assert_allclose(losses.rkd(s, t, 1.0, 0.0), ref_rkd(s, t, 1.0, 0.0), rtol=RTOL)
    np.testing.assert_allclose(losses.correlation_congruence(s, t, 2.0), ref_cc(s, t, 2.0), rtol=RTOL)


@pytest.mark.parametrize("name", NAMES)
def test_student_gradient_against_finite_differences(name, rng):
    fn, ref, s, t = _cases(rng)[name]
    got = np.asarray(jax.grad(lambda x: fn(x, jnp.asarray(t, jnp.float32)))(jnp.asarray(s, jnp.float32)))
    want = fd_grad(lambda x: ref(x, t), s, h=1e-6)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("name", NAMES)
def test_no_gradient_reaches_the_teacher(name, rng):
    fn, _, s, t = _cases(rng)[name]
    g = jax.grad(lambda y: fn(jnp.asarray(s, jnp.float32), y))(jnp.asarray(t, jnp.float32))
    assert not np.any(np.asarray(g))


@pytest.mark.parametrize("name", NAMES)
def test_a_masked_example_counts_for_nothing(name, rng):
    """`where` gives the loss of the unmasked examples alone, whatever the masked one holds (NaN included)."""
    fn, _, s, t = _cases(rng)[name]
    where = np.ones(len(s), bool)
    where[1] = False
    s_bad, t_bad = s.copy(), t.copy()
    s_bad[1], t_bad[1] = np.nan, np.inf
    got = fn(jnp.asarray(s_bad, jnp.float32), jnp.asarray(t_bad, jnp.float32), where=jnp.asarray(where))
    np.testing.assert_allclose(float(got), float(fn(s[where], t[where])), rtol=1e-5)
    g = jax.grad(lambda x: fn(x, jnp.asarray(t_bad, jnp.float32), where=jnp.asarray(where)))(
        jnp.asarray(s_bad, jnp.float32)
    )
    assert np.all(np.isfinite(np.asarray(g))) and not np.any(np.asarray(g)[1])


def test_identical_student_and_teacher_give_zero(rng):
    f, maps, z = rng.normal(size=(6, 5)), rng.normal(size=(2, 3, 3, 4)), rng.normal(size=(6, 10))
    for value in (
        losses.pkt(f, f),
        losses.rkd(f, f),
        losses.similarity_preserving(f, f),
        losses.correlation_congruence(f, f),
        losses.nst(maps, maps),
        losses.logit_standardized_kd(z, z),
    ):
        assert float(value) == pytest.approx(0.0, abs=1e-5)
    assert float(losses.dist(z, z)) == pytest.approx(0.0, abs=1e-5)


def test_logit_standardisation_ignores_the_teachers_shift_and_scale(rng):
    s, t = rng.normal(size=(4, 10)), rng.normal(size=(4, 10))
    np.testing.assert_allclose(
        losses.logit_standardized_kd(s, 7.0 * t + 3.0), losses.logit_standardized_kd(s, t), rtol=1e-5
    )


def test_extreme_logits_stay_finite(rng):
    s = jnp.asarray(rng.normal(size=(6, 10)) * 1e4, jnp.float32)
    t = jnp.asarray(rng.normal(size=(6, 10)) * 1e4, jnp.float32)
    for fn in (losses.dist, losses.logit_standardized_kd, losses.pkt, losses.similarity_preserving):
        value, grad = jax.value_and_grad(lambda x, fn=fn: fn(x, t))(s)
        assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad))), fn.__name__
    const = jnp.zeros((3, 10))  # constant logits: zero spread, no NaN
    value, grad = jax.value_and_grad(lambda x: losses.logit_standardized_kd(x, t[:3]))(const)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))


def test_bad_shapes_and_values_are_named():
    with pytest.raises(ValueError, match=r"pkt: 4 student examples .* but 5 teacher"):
        losses.pkt(np.zeros((4, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"nst: .*differ in batch or spatial shape"):
        losses.nst(np.zeros((2, 4, 4, 3)), np.zeros((2, 2, 2, 3)))
    with pytest.raises(ValueError, match=r"nst: student_feat must have at least 4 axes"):
        losses.nst(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"dist: expected .* \(N, C\)"):
        losses.dist(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"dist: temperature must be > 0, got -1"):
        losses.dist(np.zeros((2, 3)), np.zeros((2, 3)), temperature=-1.0)
    with pytest.raises(ValueError, match=r"rkd: where must be a boolean array of shape \(3,\)"):
        losses.rkd(np.zeros((3, 2)), np.zeros((3, 2)), where=np.ones(4, bool))
    with pytest.raises(ValueError, match=r"logit_standardized_kd: standardising needs at least 2 classes"):
        losses.logit_standardized_kd(np.zeros((3, 1)), np.zeros((3, 1)))


def test_zoo_losses_run_under_jit_and_in_bfloat16(rng):
    s = jnp.asarray(rng.normal(size=(4, 3, 3, 5)), jnp.bfloat16)
    t = jnp.asarray(rng.normal(size=(4, 3, 3, 6)), jnp.bfloat16)
    for fn in (losses.pkt, losses.rkd, losses.similarity_preserving, losses.correlation_congruence, losses.nst):
        value = jax.jit(fn)(s, t)
        assert value.dtype == jnp.float32 and np.isfinite(float(value)), fn.__name__


def test_dists_gradient_grows_as_t_squared_where_kds_does_not():
    """Why DIST tunes its own temperature (docs/methods.md): T^2 (1 - Pearson(softmax(z / T), ...)) tends to
    T^2 (1 - Pearson(z_s, z_t)) as T grows, so its logit gradient grows as T^2; KD's T^2 KL only offsets the
    1/T^2 its gradient loses. Doubling T from 10 to 20 multiplies DIST's gradient by about 4 and KD's by about 1."""
    rng = np.random.default_rng(0)
    s, t = jnp.asarray(rng.normal(size=(64, 10))), jnp.asarray(rng.normal(size=(64, 10)) * 3)

    def grad_norm(loss, temperature):
        return float(jnp.linalg.norm(jax.grad(lambda z: loss(z, t, temperature=temperature))(s)))

    dist, kd = losses.dist, losses.kd_kl  # both reduce to a scalar (kd_kl: the batch mean)
    assert grad_norm(dist, 20.0) / grad_norm(dist, 10.0) == pytest.approx(4.0, rel=0.05)
    assert grad_norm(kd, 20.0) / grad_norm(kd, 10.0) == pytest.approx(1.0, rel=0.1)
    assert grad_norm(dist, 10.0) / grad_norm(kd, 10.0) > 10 * grad_norm(dist, 1.0) / grad_norm(kd, 1.0)


def test_mlkds_gradient_does_not_grow_with_the_tuned_temperature():
    """Why MLKD, unlike DIST, may tune its temperature over KD's grid (docs/methods.md): its tuned T enters as one KL
    (T^2 offsets the 1/T^2 its gradient loses) and as relation terms of softmax(z / T) that flatten as T grows, beside
    the four fixed temperatures; doubling T from 10 to 20 leaves its logit gradient within 10%, either scaling."""
    rng = np.random.default_rng(0)
    s, t = jnp.asarray(rng.normal(size=(64, 10))), jnp.asarray(rng.normal(size=(64, 10)) * 3)

    def grad_norm(temperature, batch_invariant, fixed=MLKD_TEMPERATURES):
        temperatures = (temperature, *fixed)
        loss = lambda z: losses.mlkd(z, t, temperatures, batch_invariant=batch_invariant)  # noqa: E731
        return float(jnp.linalg.norm(jax.grad(loss)(s)))

    for batch_invariant in (False, True):
        assert grad_norm(20.0, batch_invariant) / grad_norm(10.0, batch_invariant) == pytest.approx(1.0, rel=0.1)
        assert grad_norm(40.0, batch_invariant) / grad_norm(2.0, batch_invariant) == pytest.approx(1.0, rel=0.1)
        # the tuned temperature's own three levels, without the fixed ones: flat too, where DIST's grows 4x
        alone = grad_norm(20.0, batch_invariant, ()) / grad_norm(10.0, batch_invariant, ())
        assert alone == pytest.approx(1.0, rel=0.1)
