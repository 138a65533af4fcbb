"""The related methods (docs/methods.md): their losses against float64 NumPy references of the formulas, their input
transforms, the samples their objectives make, and every method training through the engine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from extkd_jax import losses
from extkd_jax.data import mixing
from extkd_jax.train import sharding
from extkd_jax.train.epoch import make_run_steps
from tests.test_losses import np_softmax
from tests.tiny import random_teacher, tiny_config, tiny_setup

RTOL = 1e-5


@pytest.fixture
def rng():
    return np.random.default_rng(3)


def _kl_rows(p, q):
    return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


def _huber(x):
    x = np.abs(x)
    return np.where(x < 1, 0.5 * x * x, x - 0.5)


def ref_rkd_distance(s, t):
    n = len(s)
    off = ~np.eye(n, dtype=bool)

    def norm(e):
        d = np.sqrt(((e[:, None] - e[None]) ** 2).sum(-1))
        return d / d[off].mean()

    return _huber(norm(s) - norm(t))[off].mean()


def ref_rkd_angle(s, t):
    n, values = len(s), []
    for j in range(n):
        for i in range(n):
            for k in range(n):
                if i == j or k == j:
                    continue

                def cos(e, i=i, j=j, k=k):
                    a, b = e[i] - e[j], e[k] - e[j]
                    return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

                values.append(_huber(cos(s) - cos(t)))
    return np.mean(values)


def test_rkd_against_numpy(rng):
    s, t = rng.normal(size=(6, 5)), rng.normal(size=(6, 5)) * 3
    np.testing.assert_allclose(losses.rkd_distance(s, t), ref_rkd_distance(s, t), rtol=RTOL)
    np.testing.assert_allclose(losses.rkd_angle(s, t), ref_rkd_angle(s, t), rtol=RTOL)
    where = np.array([True, True, False, True, True, True])  # a masked example leaves every pair it is in
    np.testing.assert_allclose(losses.rkd_distance(s, t, where=where), ref_rkd_distance(s[where], t[where]), rtol=RTOL)
    np.testing.assert_allclose(losses.rkd_angle(s, t, where=where), ref_rkd_angle(s[where], t[where]), rtol=RTOL)
    g = jax.grad(lambda x: losses.rkd_distance(x, t) + losses.rkd_angle(x, t))(jnp.asarray(s, jnp.float32))
    assert np.all(np.isfinite(np.asarray(g)))
    assert float(losses.rkd_distance(2 * t, t)) == pytest.approx(0.0, abs=1e-6)  # distances are scale-free


def test_triplet_margin_against_numpy(rng):
    a, p, n = (rng.normal(size=(7, 4)) for _ in range(3))

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    want = np.maximum(((unit(a) - unit(p)) ** 2).sum(-1) - ((unit(a) - unit(n)) ** 2).sum(-1) + 0.3, 0)
    np.testing.assert_allclose(losses.triplet_margin(a, p, n, 0.3, reduction="none"), want, rtol=RTOL, atol=1e-7)
    assert float(losses.triplet_margin(a, a, -a, 0.5)) == 0.0  # already far apart


def test_mixture_kd_against_numpy(rng):
    s, ta, tb = (rng.normal(size=(5, 6)) * 2 for _ in range(3))
    lam, temp = 0.3, 2.0
    q = np_softmax(s / temp)
    want = temp**2 * (lam * _kl_rows(np_softmax(ta / temp), q) + (1 - lam) * _kl_rows(np_softmax(tb / temp), q))
    np.testing.assert_allclose(losses.mixture_kd(s, ta, tb, lam, temp, reduction="none"), want, rtol=RTOL)
    np.testing.assert_allclose(losses.mixture_kd(s, ta, ta, lam, temp), losses.kd_kl(s, ta, temp), rtol=RTOL)


def test_channel_distillation_against_numpy(rng):
    s, t = rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(2, 3, 4, 5))
    temp = 4.0

    def dist(x):  # (N, C, H*W) distributions over positions
        return np_softmax(x.reshape(2, 12, 5).transpose(0, 2, 1) / temp)

    want = temp**2 * _kl_rows(dist(t), dist(s)).mean(-1)
    np.testing.assert_allclose(losses.channel_distillation(s, t, temp, reduction="none"), want, rtol=RTOL)


def test_feature_kl_and_smoothness_against_numpy(rng):
    s, t = rng.normal(size=(4, 8)), rng.normal(size=(4, 8))
    want = 9 * _kl_rows(np_softmax(t / 3), np_softmax(s / 3))
    np.testing.assert_allclose(losses.feature_kl(s, t, 3.0, reduction="none"), want, rtol=RTOL)
    f = [rng.normal(size=(4, 3, 3, 2)), rng.normal(size=(4, 6))]
    g = [x + 0.1 * rng.normal(size=x.shape) for x in f]
    want = sum(((b - a) ** 2).reshape(4, -1).sum(1) / (a**2).reshape(4, -1).sum(1) for a, b in zip(f, g))
    np.testing.assert_allclose(losses.smoothness(f, g, reduction="none"), want, rtol=RTOL)


def test_mixup_cutmix_and_rotations(rng):
    images = jnp.asarray(rng.uniform(0, 255, size=(6, 8, 8, 3)), jnp.float32)
    targets = jax.nn.one_hot(jnp.arange(6) % 3, 3)
    mixed, mixed_targets, lam, perm = mixing.mixup(jax.random.key(0), images, targets, 1.0)
    np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[perm], rtol=1e-6)
    np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, rtol=1e-6)
    cut, cut_targets, kept, perm = mixing.cutmix(jax.random.key(1), images, targets, 1.0)
    moved = np.asarray(perm) != np.arange(6)  # an image paired with itself shows no box
    from_other = np.asarray(jnp.all(cut == images[perm], axis=-1) & ~jnp.all(images == images[perm], axis=-1))
    # the targets mix by the exact area pasted from the other image
    np.testing.assert_allclose(1 - from_other[moved].mean(axis=(1, 2)), float(kept), atol=1e-6)
    np.testing.assert_allclose(cut_targets, kept * targets + (1 - kept) * targets[perm], rtol=1e-6)
    turns = jnp.asarray([0, 1, 2, 3, 5, 6])
    turned = np.asarray(mixing.rotate90(images, turns))
    for i, k in enumerate(np.asarray(turns)):
        np.testing.assert_array_equal(turned[i], np.rot90(np.asarray(images[i]), k % 4, axes=(0, 1)))


def test_auto_policy_ops_against_numpy(rng):
    x = rng.integers(0, 256, size=(5, 6, 3)).astype(np.float64)
    grey = x.mean(-1, keepdims=True)
    want = {
        "solarize": np.where(x >= 192, 255 - x, x),
        "posterize": np.floor(x / 32) * 32,
        "invert": 255 - x,
        "brightness": np.clip(1.3 * x, 0, 255),
        "color": np.clip(grey + 1.5 * (x - grey), 0, 255),
        "contrast": np.clip(grey.mean() + 1.5 * (x - grey.mean()), 0, 255),
        "autocontrast": (x - x.min((0, 1))) * 255 / (x.max((0, 1)) - x.min((0, 1))),
    }
    for name, expected in want.items():
        np.testing.assert_allclose(
            mixing.AUTO_OPS[name](jnp.asarray(x, jnp.float32)), expected, rtol=1e-5, atol=1e-3, err_msg=name
        )
    shifted = np.asarray(mixing.AUTO_OPS["translate_x"](jnp.asarray(x, jnp.float32)))
    np.testing.assert_array_equal(shifted[:, 0], 0)
    np.testing.assert_array_equal(shifted[:, 1:], x[:, :-1])
    batch = jnp.asarray(rng.integers(0, 256, size=(2000, 4, 4, 3)), jnp.uint8)
    out = np.asarray(mixing.auto_policy(jax.random.key(0), batch))
    changed = (out != np.asarray(batch)).any(axis=(1, 2, 3)).mean()
    assert out.dtype == np.uint8 and 0.94 < changed < 0.98  # nine ops at p=0.3: 1 - 0.7^9 = 0.96 of images change


def _train(loss: str, model: str = "resnet8", steps: int = 6, **overrides):
    metrics, program, _ = _run(loss, model, steps, **overrides)
    return metrics, program


def _run(loss: str, model: str = "resnet8", steps: int = 6, **overrides):
    """`steps` steps of `loss` on random data: (metrics, program, final state)."""
    config = tiny_config(
        ".", **{"model.name": model, "loss.name": loss, "batch_size": 16, "optim.learning_rate": 0.05, **overrides}
    )
    if model != "mlp":
        config.model.kwargs = {}
    shape = (8, 8, 3) if model != "mlp" else (8, 8, 1)
    teacher = None if loss in ("ce", "purf") else (random_teacher("resnet14") if model != "mlp" else None)
    if model == "mlp" and teacher is None and loss not in ("ce", "purf"):
        from extkd_jax.train.setup import build_model
        from extkd_jax.train.step import Network, split

        graph, variables = split(build_model("mlp", {"hidden_sizes": (32, 32), "input_size": 64}, 10, 5, jnp.float32))
        teacher = (Network(graph, np.full(1, 120.0, np.float32), np.full(1, 60.0, np.float32), jnp.float32), variables)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(16, *shape), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(16,)).astype(np.int32)
    program = tiny_setup(config, shape, steps, teacher, train_labels=labels if loss == "crd" else None)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (sharding.DATA_AXIS,))
    run_steps = make_run_steps(program.step_fn, mesh, 16, "none")
    state = sharding.put_replicated(program.init_state(), mesh)
    teacher_variables = None if teacher is None else sharding.put_replicated(program.teacher_variables, mesh)
    state, metrics = run_steps(
        state, teacher_variables, images, labels, jnp.arange(16), jax.random.key(0), jnp.int32(0), num_steps=steps
    )
    return jax.tree.map(np.asarray, metrics), program, state


PARTS = {
    "mkd": ("kd",),
    "mtkd_ssr": ("scd", "srd", "crd"),
    "amkd": ("adv_kd", "triplet"),
    "pfkd": ("feature",),
    "mismatch": ("sampled_kd",),
    "purf": ("smoothness",),
    "ssd_kd": ("relation", "rotation", "rotated_kd"),
    # the KD zoo (#15)
    "pkt": ("pkt",),
    "rkd": ("rkd",),
    "sp": ("sp",),
    "cc": ("cc",),
    "nst": ("nst",),
    "dist": ("dist",),
    "ls_kd": ("ls_kd",),
    "mlkd": ("mlkd",),
    "vid": ("vid",),
    "ab": ("ab",),
    "fsp": ("fsp",),
    "ft": ("ft", "reconstruction"),
    "reviewkd": ("review",),
    "ofd": ("ofd",),
    "crd": ("contrast",),
    "kdsvd": ("kdsvd",),
}


@pytest.mark.parametrize("loss", list(PARTS))
def test_every_method_trains_through_the_engine(loss):
    # a rising weight raises the loss
    ramp_free = {f"loss.{loss}.warmup_fraction": 0.0} if loss in ("reviewkd", "dkd") else {}
    metrics, program = _train(loss, **ramp_free)
    assert np.all(np.isfinite(metrics["loss"])) and metrics["loss"][-1] < metrics["loss"][0]
    for part in PARTS[loss]:
        assert np.all(metrics[part] >= 0) and metrics[part].max() > 0, part
    module = program.student.graph.merge(program.variables)
    assert len(module.heads) == (3 if loss == "mtkd_ssr" else 0)  # one head per student stage
    assert (module.projector is not None) == (loss in ("amkd", "pfkd", "ssd_kd", "ft", "reviewkd", "ofd", "crd"))


@pytest.mark.parametrize("loss", ["mtkd_ssr", "ssd_kd", "amkd", "mismatch"])
def test_methods_on_an_mlp(loss):
    metrics, _ = _train(loss, model="mlp")
    assert np.all(np.isfinite(metrics["loss"]))


@pytest.mark.parametrize("loss", ["ab", "fsp"])
def test_init_stage_methods_train_the_feature_loss_alone_then_plain_kd(loss):
    """ab and fsp: while epoch < loss.<name>.init_epochs the total is loss.<name>.weight x the feature loss; after
    it, CE + KL exactly (RepDistiller's init stage)."""
    metrics, _ = _train(loss, steps=3, **{f"loss.{loss}.init_epochs": 100.0, f"loss.{loss}.weight": 2.0})
    np.testing.assert_allclose(metrics["loss"], 2.0 * metrics[loss], rtol=1e-6)
    plain_kd = {f"loss.{loss}.init_epochs": 0.0, "loss.ce_weight": 0.3, "loss.kd_weight": 0.7}
    metrics, _ = _train(loss, steps=3, **plain_kd)
    np.testing.assert_allclose(metrics["loss"], 0.3 * metrics["ce"] + 0.7 * metrics["kd"], rtol=1e-5)
    assert metrics[loss].max() > 0


def test_ft_trains_the_paraphraser_alone_in_its_init_stage_then_freezes_it():
    """ft: while epoch < init_epochs the total is the paraphraser's reconstruction error and the student model does
    not move; after it, CE + KL + ft_weight x FT exactly, and the paraphraser does not move."""
    no_decay = {"optim.weight_decay": 0.0, "loss.ce_weight": 0.3, "loss.kd_weight": 0.7, "loss.ft.weight": 5.0}
    metrics, program, state = _run("ft", steps=3, **{"loss.ft.init_epochs": 100.0, **no_decay})
    np.testing.assert_allclose(metrics["loss"], metrics["reconstruction"], rtol=1e-6)
    start = program.variables["params"]
    assert _changed(start["projector"], state.params["projector"])  # the paraphraser learns
    assert not _changed(start["model"], state.params["model"])  # the student waits
    metrics, program, state = _run("ft", steps=3, **{"loss.ft.init_epochs": 0.0, **no_decay})
    want = 0.3 * metrics["ce"] + 0.7 * metrics["kd"] + 5.0 * metrics["ft"]
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
    start = program.variables["params"]
    assert not _changed(start["projector"], state.params["projector"])
    assert _changed(start["connectors"], state.params["connectors"])  # the translator learns


def _changed(before, after) -> bool:
    return any(
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    )


@pytest.mark.parametrize("loss", ["ft", "reviewkd", "kdsvd"])
def test_feature_map_methods_refuse_vector_segments(loss):
    with pytest.raises(ValueError, match=f"loss.name='{loss}' needs feature maps"):
        _train(loss, model="mlp")


def test_ofd_reads_pre_activation_taps_and_the_teachers_bn_margins():
    """The ResNets' taps are their stages before the last ReLU; OFD's margins come from the teacher's BN before
    each tap; an MLP has no taps and is refused by name."""
    from extkd_jax.models import forward_with_segments
    from extkd_jax.train.setup import build_model

    model = build_model("resnet8", {}, 10, 0, jnp.float32)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
    _, segments = forward_with_segments(model, x, train=False)
    _, taps = forward_with_segments(model, x, train=False, taps="preact")
    for seg, tap in zip(segments, taps, strict=True):
        np.testing.assert_array_equal(np.asarray(seg), np.maximum(np.asarray(tap), 0))
        assert np.any(np.asarray(tap) < 0)
    _, program = _train("ofd", steps=2)  # the teacher is folded; its margins were read before folding
    margins = program.student.graph.merge(program.variables).projector.values()
    network, variables = random_teacher("resnet14")
    teacher_model = network.graph.merge(variables)
    want = [losses.ofd_margin(bn.scale[...], bn.bias[...]) for bn in teacher_model.bn_before_relu()]
    for got, expected in zip(margins, want, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6)
    with pytest.raises(ValueError, match="sows no pre-activation taps"):
        _train("ofd", model="mlp")


def test_reviewkd_fuses_into_the_teachers_shapes_and_ramps_in():
    """The ABF chain maps resnet8's three stages and pooled features to resnet14's shapes; the review term's weight
    grows linearly over the first `warmup_fraction` of the run."""
    overrides = {"num_epochs": 2, "loss.reviewkd.warmup_fraction": 0.5, "loss.ce_weight": 0.3, "loss.kd_weight": 0.7}
    metrics, program = _train("reviewkd", steps=4, **overrides)
    ramp = np.arange(4) / 4.0  # epoch = step / 4 (4 steps per epoch here), warm-up over 0.5 x 2 = 1 epoch
    want = 0.3 * metrics["ce"] + 0.7 * metrics["kd"] + ramp * metrics["review"]
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
    fusion = program.student.graph.merge(program.variables).projector
    assert len(fusion.fusions) == 4 and fusion.fusions[-1].attention is None  # the pooled features fuse nothing


def test_vid_regressors_and_variances_are_trained_and_checkpointed_student_state():
    metrics, program = _train("vid", model="mlp")
    module = program.student.graph.merge(program.variables)
    assert len(module.connectors) == 2  # one regressor per paired hidden layer
    scale = np.asarray(module.connectors[0].log_scale[...])
    assert scale.shape == (32,) and np.allclose(scale, losses.vid_log_scale(5.0))
    assert "log_scale" in str(jax.tree_util.tree_structure(program.variables["params"]))
    assert np.all(np.isfinite(metrics["loss"]))


def test_nst_refuses_a_student_without_feature_maps():
    with pytest.raises(ValueError, match="loss.name='nst' needs feature maps"):
        _train("nst", model="mlp")


def test_batch_mixes_reach_teacher_and_student_alike():
    for augment in ("none+mixup", "none+cutmix"):
        metrics, _ = _train("kd", **{"data.augment": augment})
        assert np.all(np.isfinite(metrics["loss"])) and metrics["kd"].max() > 0


def test_boundary_and_sampled_images_do_what_they_claim():
    """The attack moves images towards the teacher's second class; the sampler raises the teacher's confidence in
    the class it draws."""
    from extkd_jax.train import objectives

    network, variables = random_teacher("resnet8")
    images = jnp.asarray(np.random.default_rng(1).uniform(0, 255, size=(16, 8, 8, 3)), jnp.float32)
    ctx = objectives.Context(
        tiny_config(".").loss,
        images,
        jnp.zeros(16, jnp.int32),
        jax.nn.one_hot(jnp.zeros(16, jnp.int32), 10),
        jax.random.key(0),
        0.0,
        None,
        (),
        None,
        lambda x: network.frozen_outputs(variables, x),
        lambda x: network.logits(variables, x),
    )
    before = network.logits(variables, images)
    adversarial, target = objectives.boundary_samples(ctx, steps=10, step_size=200.0)
    after = network.logits(variables, adversarial)

    def gap(z):
        return np.asarray(jnp.take_along_axis(z, target[:, None], -1)[:, 0] - z.max(-1))

    assert np.mean(gap(after) > gap(before)) > 0.9  # the target class closes in on (or passes) the top one
    sampled, wanted, confidence = objectives.sampled_images(ctx, steps=10, step_size=8.0)
    start = np.asarray(jax.nn.softmax(network.logits(variables, images)))
    assert float(np.mean(confidence)) > float(np.mean(start[np.arange(16), np.asarray(wanted)]))


def test_mlkd_batch_invariant_reaches_the_loss():
    """loss.mlkd.batch_invariant changes MLKD's first-step value (same weights, same batch) and nothing else of it."""
    reference, _ = _train("mlkd", steps=1, **{"loss.mlkd.batch_invariant": False})
    invariant, _ = _train("mlkd", steps=1, **{"loss.mlkd.batch_invariant": True})
    assert np.isfinite(invariant["mlkd"][0]) and invariant["mlkd"][0] != pytest.approx(reference["mlkd"][0], rel=1e-3)
    np.testing.assert_allclose(invariant["ce"], reference["ce"], rtol=1e-6)
