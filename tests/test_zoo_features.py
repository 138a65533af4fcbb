"""The KD zoo, part 2 (#15): FSP, VID, activation boundaries and MLKD against float64 NumPy references written
from the published formulas with loops, their gradients against central finite differences, and the contract:
masks, named errors, no teacher gradient, jit and bfloat16."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from extkd_jax import losses
from tests.test_losses import fd_grad, np_softmax

RTOL = 2e-5


@pytest.fixture
def rng():
    return np.random.default_rng(151)


def _pool(x, size):
    """Average of each (h / size) x (w / size) block, by loops."""
    n, h, w, c = x.shape
    fh, fw = h // size, w // size
    out = np.zeros((n, size, size, c))
    for i in range(size):
        for j in range(size):
            out[:, i, j] = x[:, i * fh : (i + 1) * fh, j * fw : (j + 1) * fw].mean(axis=(1, 2))
    return out


def _fsp_matrix(bottom, top):
    if bottom.ndim == 4 and top.ndim == 4:
        size = min(bottom.shape[1], top.shape[1])
        bottom, top = _pool(bottom, size), _pool(top, size)
        bottom = bottom.reshape(len(bottom), -1, bottom.shape[-1])
        top = top.reshape(len(top), -1, top.shape[-1])
    else:
        bottom = (bottom if bottom.ndim == 2 else bottom.mean(axis=(1, 2)))[:, None, :]
        top = (top if top.ndim == 2 else top.mean(axis=(1, 2)))[:, None, :]
    n, p = bottom.shape[:2]
    g = np.zeros((n, top.shape[-1], bottom.shape[-1]))
    for e in range(n):
        for i in range(top.shape[-1]):
            for j in range(bottom.shape[-1]):
                g[e, i, j] = sum(top[e, q, i] * bottom[e, q, j] for q in range(p)) / p
    return g


def ref_fsp(student, teacher):
    per_example = 0.0
    for k in range(len(student) - 1):
        diff = _fsp_matrix(student[k], student[k + 1]) - _fsp_matrix(teacher[k], teacher[k + 1])
        per_example = per_example + (diff**2).mean(axis=(1, 2))
    return float(np.mean(per_example))


def ref_vid(mu, t, log_scale, eps=1e-5):
    var = np.log1p(np.exp(log_scale)) + eps
    return float(np.mean(0.5 * ((mu - t) ** 2 / var + np.log(var))))


def ref_ab(s, t, margin=1.0):
    total = 0.0
    for idx in np.ndindex(s.shape):
        if s[idx] > -margin and t[idx] <= 0:
            total += (s[idx] + margin) ** 2
        if s[idx] <= margin and t[idx] > 0:
            total += (s[idx] - margin) ** 2
    return total / len(s)


def ref_mlkd(zs, zt, temperatures=(4.0, 2.0, 3.0, 5.0, 6.0), batch_invariant=False, levels=(1.0, 1.0, 1.0)):
    n, c = zs.shape
    total = 0.0
    for temp in temperatures:
        ps, pt = np_softmax(zs / temp), np_softmax(zt / temp)
        instance = temp**2 * np.mean([np.sum(pt[i] * (np.log(pt[i]) - np.log(ps[i]))) for i in range(n)])
        classes = sum(
            (sum(pt[e, a] * pt[e, b] for e in range(n)) - sum(ps[e, a] * ps[e, b] for e in range(n))) ** 2
            for a in range(c)
            for b in range(c)
        )
        batch = sum((pt[i] @ pt[j] - ps[i] @ ps[j]) ** 2 for i in range(n) for j in range(n))
        classes, batch = (classes * c / n**2, batch * c / n**2) if batch_invariant else (classes / c, batch / n)
        total += levels[0] * instance + levels[1] * classes + levels[2] * batch
    return total


def ref_ft(s, t, p1=2.0):
    size = min(s.shape[1], t.shape[1])
    s, t = _pool(s, size), _pool(t, size)

    def factor(f):
        x = np.array(
            [[np.mean(np.abs(f[e, i, j]) ** p1) for i in range(size) for j in range(size)] for e in range(len(f))]
        )
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    return float(np.mean(np.abs(factor(s) - factor(t))))


def ref_hcl(student, teacher, levels=(4, 2, 1)):
    total = 0.0
    for s, t in zip(student, teacher, strict=True):
        h = s.shape[1]
        loss, weight, norm = np.mean((s - t) ** 2), 1.0, 1.0
        for level in levels:
            if level >= h:
                continue
            weight /= 2
            loss += weight * np.mean((_pool(s, level) - _pool(t, level)) ** 2)
            norm += weight
        total += loss / norm
    return float(total)


def ref_ofd(s, t, margin):
    n, h, w, c = s.shape
    total = 0.0
    for e, i, j, k in np.ndindex(n, h, w, c):
        a, b, m = s[e, i, j, k], t[e, i, j, k], margin[k]
        if a > m and b <= m:
            total += (a - m) ** 2
        if a > b and m < b <= 0:
            total += (a - b) ** 2
        if b > 0:
            total += (a - b) ** 2
    return total / n


def ref_ofd_margin(scale, bias):
    out = []
    for sd, m in zip(np.abs(scale), bias, strict=True):
        below = 0.5 * math.erfc((m / sd) / math.sqrt(2))  # Phi(-m / s)
        if below > 0.001:
            out.append(-sd * math.exp(-((m / sd) ** 2) / 2) / math.sqrt(2 * math.pi) / below + m)
        else:
            out.append(-3 * sd)
    return np.array(out)


def ref_kdsvd(student, teacher, k=1):
    """mdistiller's kdsvd_loss in float64 NumPy (np.linalg.svd), each singular vector signed so that its largest
    entry is positive (the library's fixed sign; the reference leaves it to LAPACK)."""

    def top(x, n):
        _, sv, vh = np.linalg.svd(x.reshape(-1, x.shape[-1]), full_matrices=False)
        v = vh[:n].T
        v = v * np.where(v[np.argmax(np.abs(v), 0), np.arange(n)] < 0, -1.0, 1.0)
        return v, sv[:n] / np.linalg.norm(sv[:n])

    total = 0.0
    for e in range(len(student[0])):
        prev = None
        for s, t in zip(student, teacher, strict=True):
            v_t, sv = top(t[e], k)
            v_s, _ = top(s[e], k + 3)
            cos = v_s.T @ v_t
            match = np.where(np.abs(cos) == np.abs(cos).max(0, keepdims=True), np.sign(cos), 0.0)
            v_s, v_t = (v_s @ match) * sv, v_t * sv
            if prev is not None:
                ps, pt = prev
                for a in range(v_s.shape[0]):
                    for b in range(ps.shape[0]):
                        for j in range(k):
                            rs = np.exp(-((v_s[a, j] - ps[b, j]) ** 2) / 8)
                            rt = np.exp(-((v_t[a, j] - pt[b, j]) ** 2) / 8)
                            total += (rs - rt) ** 2
            prev = (v_s, v_t)
    return total / len(student[0])


def _cases(rng):
    """name -> (loss of (student, teacher), reference, student, teacher); FSP's inputs are segment lists."""
    fsp_s = [rng.normal(size=(3, 4, 4, 2)), rng.normal(size=(3, 2, 2, 3)), rng.normal(size=(3, 4))]
    fsp_t = [rng.normal(size=(3, 2, 2, 2)) * 2, rng.normal(size=(3, 2, 2, 3)), rng.normal(size=(3, 4))]
    log_scale = rng.normal(size=(5,))
    ofd_margin = -np.abs(rng.normal(size=(4,))) - 0.1
    return {
        "fsp": (lambda s, t, **kw: losses.fsp(s, t, **kw), ref_fsp, fsp_s, fsp_t),
        "fsp_vectors": (  # an MLP's segments: the closed form of the outer products' distance
            lambda s, t, **kw: losses.fsp(s, t, **kw),
            ref_fsp,
            [rng.normal(size=(4, 3)), rng.normal(size=(4, 5)), rng.normal(size=(4, 2))],
            [rng.normal(size=(4, 3)) * 2, rng.normal(size=(4, 5)), rng.normal(size=(4, 2)) + 1],
        ),
        "vid": (
            lambda s, t, **kw: losses.vid(s, t, jnp.asarray(log_scale, jnp.float32), **kw),
            lambda s, t: ref_vid(s, t, log_scale),
            rng.normal(size=(3, 2, 2, 5)),
            rng.normal(size=(3, 2, 2, 5)) * 2,
        ),
        "activation_boundary": (
            losses.activation_boundary,
            ref_ab,
            rng.normal(size=(4, 7)) * 1.5,
            rng.normal(size=(4, 7)),
        ),
        "mlkd": (losses.mlkd, ref_mlkd, rng.normal(size=(5, 6)) * 2, rng.normal(size=(5, 6)) * 4),
        "mlkd_batch_invariant": (
            lambda s, t, **kw: losses.mlkd(s, t, batch_invariant=True, **kw),
            lambda s, t: ref_mlkd(s, t, batch_invariant=True),
            rng.normal(size=(7, 3)) * 2,
            rng.normal(size=(7, 3)) * 4,
        ),
        "hierarchical_context": (
            lambda s, t, **kw: losses.hierarchical_context(s, t, **kw),
            ref_hcl,
            [rng.normal(size=(3, 8, 8, 2)), rng.normal(size=(3, 2, 2, 3)), rng.normal(size=(3, 1, 1, 4))],
            [rng.normal(size=(3, 8, 8, 2)) * 2, rng.normal(size=(3, 2, 2, 3)), rng.normal(size=(3, 1, 1, 4)) + 1],
        ),
        "ofd": (
            lambda s, t, **kw: losses.ofd(s, t, jnp.asarray(ofd_margin, jnp.float32), **kw),
            lambda s, t: ref_ofd(s, t, ofd_margin),
            rng.normal(size=(3, 2, 2, 4)),
            rng.normal(size=(3, 2, 2, 4)),
        ),
        "kdsvd": (
            lambda s, t, **kw: losses.kdsvd(s, t, **kw),
            ref_kdsvd,
            [rng.normal(size=(3, 3, 3, 4)), rng.normal(size=(3, 2, 2, 5))],
            [rng.normal(size=(3, 3, 3, 4)) * 2, rng.normal(size=(3, 2, 2, 5)) + 1],
        ),
        "factor_transfer": (
            losses.factor_transfer,
            ref_ft,
            rng.normal(size=(3, 4, 4, 5)),
            rng.normal(size=(3, 2, 2, 6)) + 0.5,
        ),
    }


NAMES = list(_cases(np.random.default_rng(0)))


def _f32(x):
    return [jnp.asarray(v, jnp.float32) for v in x] if isinstance(x, list) else jnp.asarray(x, jnp.float32)


@pytest.mark.parametrize("name", NAMES)
def test_value_against_numpy(name, rng):
    fn, ref, s, t = _cases(rng)[name]
    got = fn(_f32(s), _f32(t))
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), ref(s, t), rtol=RTOL, atol=1e-7)
    assert abs(ref(s, t)) > 1e-3  # the case is not a trivial zero


@pytest.mark.parametrize("name", NAMES)
def test_student_gradient_against_finite_differences(name, rng):
    fn, ref, s, t = _cases(rng)[name]
    atol = 1e-4 if name == "kdsvd" else 2e-5  # kdsvd: float32 orthogonal iteration on the Gram matrix
    if isinstance(s, list):  # one student segment at a time
        for k in range(len(s)):

            def on_segment(x, k=k):
                return ref([*s[:k], x, *s[k + 1 :]], t)

            got = jax.grad(lambda x, k=k: fn([*_f32(s)[:k], x, *_f32(s)[k + 1 :]], _f32(t)))(_f32(s[k]))
            want = fd_grad(on_segment, s[k], h=1e-6)
            np.testing.assert_allclose(np.asarray(got), want, rtol=2e-3, atol=atol * np.abs(want).max())
        return
    got = np.asarray(jax.grad(lambda x: fn(x, _f32(t)))(_f32(s)))
    want = fd_grad(lambda x: ref(x, t), s, h=1e-6)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=atol * np.abs(want).max())


def test_vid_variance_gradient_against_finite_differences(rng):
    mu, t, log_scale = rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), rng.normal(size=(4,))
    got = jax.grad(lambda v: losses.vid(_f32(mu), _f32(t), v))(_f32(log_scale))
    want = fd_grad(lambda v: ref_vid(mu, t, v), log_scale, h=1e-6)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-3, atol=1e-6)


def test_vid_starts_at_the_configured_variance():
    scale = losses.vid_log_scale(5.0)
    assert float(losses.vid_variance(jnp.float32(scale))) == pytest.approx(5.0, rel=1e-6)
    with pytest.raises(ValueError, match=r"vid_log_scale: init_variance=0.0; expected a variance above eps"):
        losses.vid_log_scale(0.0)


@pytest.mark.parametrize("name", NAMES)
def test_no_gradient_reaches_the_teacher(name, rng):
    fn, _, s, t = _cases(rng)[name]
    g = jax.grad(lambda y: fn(_f32(s), y))(_f32(t))
    assert not any(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(g))


@pytest.mark.parametrize("name", NAMES)
def test_a_masked_example_counts_for_nothing(name, rng):
    """`where` gives the loss of the unmasked examples alone, whatever the masked one holds (NaN included)."""
    fn, _, s, t = _cases(rng)[name]

    def spoil(x, value):
        x = [v.copy() for v in x] if isinstance(x, list) else x.copy()
        for v in x if isinstance(x, list) else [x]:
            v[1] = value
        return x

    def keep(x, where):
        return [v[where] for v in x] if isinstance(x, list) else x[where]

    where = np.ones(len(t[0]) if isinstance(t, list) else len(t), bool)
    where[1] = False
    s_bad, t_bad = spoil(s, np.nan), spoil(t, np.inf)
    got = fn(_f32(s_bad), _f32(t_bad), where=jnp.asarray(where))
    np.testing.assert_allclose(float(got), float(fn(_f32(keep(s, where)), _f32(keep(t, where)))), rtol=1e-5)
    g = jax.grad(lambda x: fn(x, _f32(t_bad), where=jnp.asarray(where)))(_f32(s_bad))
    for leaf in jax.tree.leaves(g):
        assert np.all(np.isfinite(np.asarray(leaf))) and not np.any(np.asarray(leaf)[1])


def test_identical_features_give_zero_and_ab_respects_the_margin(rng):
    maps = [rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(2, 2, 2, 3))]
    assert float(losses.fsp(maps, maps)) == pytest.approx(0.0, abs=1e-7)
    z = rng.normal(size=(4, 10))
    assert float(losses.mlkd(z, z)) == pytest.approx(0.0, abs=1e-6)
    teacher = rng.normal(size=(3, 8))
    # a student on the right side of every boundary by at least the margin costs nothing
    assert float(losses.activation_boundary(np.where(teacher > 0, 1.5, -1.5), teacher, margin=1.0)) == 0.0


def test_mlkd_batch_invariant_equals_the_reference_at_n_equal_c_and_stays_bounded_as_n_grows(rng):
    z = rng.normal(size=(6, 6)) * 3
    t = rng.normal(size=(6, 6)) * 3
    assert float(losses.mlkd(z, t, batch_invariant=True)) == pytest.approx(float(losses.mlkd(z, t)), rel=1e-6)
    # the batch repeated 16 times: the reference's relation terms grow 256x (class) and 16x (batch), these do not
    big_s, big_t = np.tile(z[:, :3], (16, 1)), np.tile(t[:, :3], (16, 1))
    growth = float(losses.mlkd(big_s, big_t, (4.0,)) - losses.mlkd(z[:, :3], t[:, :3], (4.0,)))
    assert growth > 1.0  # the reference grew
    same = (
        losses.mlkd(big_s, big_t, (4.0,), batch_invariant=True),
        losses.mlkd(z[:, :3], t[:, :3], (4.0,), batch_invariant=True),
    )
    assert float(same[0]) == pytest.approx(float(same[1]), rel=1e-5)


@pytest.mark.parametrize("levels", [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.5, 2.0, 0.0)])
@pytest.mark.parametrize("batch_invariant", [False, True])
def test_mlkd_level_weights_select_the_levels_of_the_float64_reference(rng, levels, batch_invariant):
    """The ablation's levels (instance, class, batch), each against the float64 reference's own term."""
    s, t = rng.normal(size=(5, 4)) * 2, rng.normal(size=(5, 4)) * 3
    got = float(losses.mlkd(s, t, batch_invariant=batch_invariant, level_weights=levels))
    assert got == pytest.approx(ref_mlkd(s, t, batch_invariant=batch_invariant, levels=levels), rel=1e-5, abs=1e-7)


def test_mlkd_instance_level_alone_is_the_sum_of_kd_kls():
    z, t = np.linspace(-2, 2, 12).reshape(3, 4), np.linspace(3, -1, 12).reshape(3, 4)
    want = sum(float(losses.kd_kl(z, t, temperature)) for temperature in (4.0, 2.0))
    assert float(losses.mlkd(z, t, (4.0, 2.0), level_weights=(1, 0, 0))) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("levels", [(1.0, 1.0), (1.0, -1.0, 0.0), (1.0, float("nan"), 1.0)])
def test_mlkd_refuses_bad_level_weights(levels):
    with pytest.raises(ValueError, match="level_weights"):
        losses.mlkd(np.zeros((2, 3)), np.zeros((2, 3)), level_weights=levels)


def test_mlkd_extreme_logits_stay_finite(rng):
    s = jnp.asarray(rng.normal(size=(6, 10)) * 1e4, jnp.float32)
    t = jnp.asarray(rng.normal(size=(6, 10)) * 1e4, jnp.float32)
    value, grad = jax.value_and_grad(lambda x: losses.mlkd(x, t))(s)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))


def test_bad_shapes_and_values_are_named():
    with pytest.raises(ValueError, match=r"fsp: needs the same number \(>= 2\) of student and teacher segments"):
        losses.fsp([np.zeros((2, 3))], [np.zeros((2, 3))])
    with pytest.raises(ValueError, match=r"fsp: segments 0 and 1 give student FSP matrices \(3, 2\) and teacher"):
        losses.fsp([np.zeros((2, 2)), np.zeros((2, 3))], [np.zeros((2, 4)), np.zeros((2, 3))])
    with pytest.raises(ValueError, match=r"cannot pool a 3x3 map to 2x2"):
        losses.fsp([np.zeros((2, 3, 3, 1)), np.zeros((2, 2, 2, 1))], [np.zeros((2, 3, 3, 1)), np.zeros((2, 2, 2, 1))])
    with pytest.raises(ValueError, match=r"vid: log_scale shape \(3,\), expected one value per channel \(4,\)"):
        losses.vid(np.zeros((2, 4)), np.zeros((2, 4)), np.zeros(3))
    with pytest.raises(ValueError, match=r"vid: student_mean shape \(2, 4\) != teacher_feat shape \(2, 5\)"):
        losses.vid(np.zeros((2, 4)), np.zeros((2, 5)), np.zeros(5))
    with pytest.raises(ValueError, match=r"activation_boundary: student_feat must be \(N, D\) or \(N, H, W, C\)"):
        losses.activation_boundary(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"activation_boundary: margin must be >= 0, got -1"):
        losses.activation_boundary(np.zeros((2, 3)), np.zeros((2, 3)), margin=-1.0)
    with pytest.raises(ValueError, match=r"mlkd: temperatures must be > 0, got 0"):
        losses.mlkd(np.zeros((2, 3)), np.zeros((2, 3)), (4.0, 0.0))
    with pytest.raises(ValueError, match=r"factor_transfer: needs feature maps \(N, H, W, C\), got shapes \(2, 3\)"):
        losses.factor_transfer(np.zeros((2, 3)), np.zeros((2, 2, 2, 3)))
    with pytest.raises(
        ValueError, match=r"hierarchical_context: pair 0 has student map \(2, 4, 4, 3\) and teacher map"
    ):
        losses.hierarchical_context([np.zeros((2, 4, 4, 3))], [np.zeros((2, 4, 4, 2))])
    with pytest.raises(ValueError, match=r"hierarchical_context: needs as many student as teacher maps"):
        losses.hierarchical_context([np.zeros((2, 4, 4, 3))], [])
    with pytest.raises(ValueError, match=r"mlkd: expected student and teacher logits of one shape \(N, C\)"):
        losses.mlkd(np.zeros((2, 3)), np.zeros((2, 4)))


def test_run_under_jit_and_in_bfloat16(rng):
    s = [
        jnp.asarray(rng.normal(size=(4, 4, 4, 3)), jnp.bfloat16),
        jnp.asarray(rng.normal(size=(4, 2, 2, 3)), jnp.bfloat16),
    ]
    for value in (
        jax.jit(losses.fsp)(s, [2 * x for x in s]),
        jax.jit(losses.activation_boundary)(s[0], s[0] * 2),
        jax.jit(losses.vid)(s[1], s[1] * 2, jnp.zeros(3)),
        jax.jit(losses.mlkd)(s[1].reshape(4, -1), s[1].reshape(4, -1) * 3),
    ):
        assert value.dtype == jnp.float32 and np.isfinite(float(value))


def test_ofd_margin_against_the_gaussian_formula(rng):
    scale, bias = rng.normal(size=(6,)), rng.normal(size=(6,))
    bias[0], scale[0] = 4.0, 1.0  # P(x < 0) = 3e-5 < 0.001: the -3 |scale| branch
    got = np.asarray(losses.ofd_margin(scale, bias))
    np.testing.assert_allclose(got, ref_ofd_margin(scale, bias), rtol=1e-5, atol=1e-6)
    assert got[0] == pytest.approx(-3.0) and np.all(got < 0)


def test_singular_vectors_by_orthogonal_iteration_match_lapack(rng):
    """Vectors and values against float64 np.linalg.svd, to the accuracy the iteration count gives for the gaps."""
    for shape in [(9, 4), (4, 5), (30, 8)]:
        x = rng.normal(size=shape)
        _, sv, vh = np.linalg.svd(x, full_matrices=False)
        want = vh[:3].T * np.where(vh[:3].T[np.argmax(np.abs(vh[:3].T), 0), np.arange(3)] < 0, -1.0, 1.0)
        ratio = ((sv[1:4] / sv[:3]) ** 2).max()
        vectors, values = losses.top_right_singular_vectors(_f32(x), 3)
        np.testing.assert_allclose(np.asarray(values), sv[:3], rtol=1e-5)
        np.testing.assert_allclose(np.asarray(vectors), want, atol=max(1e-5, 10 * ratio**100))


def test_kdsvd_gradient_stays_finite_with_dead_channels(rng):
    """Zero channels give repeated zero singular values, where the exact gradient of the vectors is unbounded."""
    maps = [rng.normal(size=(2, 4, 4, 6)), np.maximum(rng.normal(size=(2, 2, 2, 6)), 0)]
    for m in maps:
        m[..., 3:] = 0.0
    teacher = [rng.normal(size=(2, 4, 4, 6)), rng.normal(size=(2, 2, 2, 6))]
    grads = jax.grad(lambda x: losses.kdsvd(x, [_f32(t) for t in teacher]))([_f32(m) for m in maps])
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    with pytest.raises(ValueError, match=r"kdsvd: segment 0 has 3 channels; k \+ 3 = 4 vectors are needed"):
        losses.kdsvd([np.zeros((2, 2, 2, 3))] * 2, [np.zeros((2, 2, 2, 3))] * 2)
    with pytest.raises(ValueError, match=r"kdsvd: segment 0: student .* expected maps \(N, H, W, C\) with equal"):
        losses.kdsvd([np.zeros((2, 2, 2, 4))] * 2, [np.zeros((2, 2, 2, 5))] * 2)
