"""The methods on inputs they make: AMKD (boundary samples, a targeted attack on the teacher), KD under
distribution mismatch (images sampled near the data, pushed towards a class by the teacher) and SSD-KD (rotated
images, a rotation task)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from extkd_jax import losses
from extkd_jax.data.mixing import mixup, rotate90
from extkd_jax.methods.base import Build, Method
from extkd_jax.methods.context import Context, pooled
from extkd_jax.models.common import linear


def boundary_samples(ctx: Context, steps: int, step_size: float):
    """Images pushed towards the boundary between each example's teacher class and its second class: a targeted
    L2 attack on the teacher (Heo et al. 2019's boundary supporting samples), `steps` normalised-gradient steps of
    `step_size` pixels, each example frozen once the teacher's top class flips. Returns (images, target class)."""
    logits = ctx.teacher()[0]
    ranked = jnp.argsort(logits, axis=-1)
    top, target = ranked[:, -1], ranked[:, -2]

    def margin(x):  # target logit minus top logit, summed over the batch (each example's own gradient)
        logits = ctx.teacher_logits_fn(x)
        return jnp.sum(jnp.take_along_axis(logits, target[:, None], -1) - jnp.take_along_axis(logits, top[:, None], -1))

    def step(x, _):
        grad = jax.grad(margin)(x)
        norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(grad), axis=(1, 2, 3), keepdims=True), 1e-12))
        flipped = jnp.argmax(ctx.teacher_logits_fn(x), -1) == target
        return jnp.where(flipped[:, None, None, None], x, jnp.clip(x + step_size * grad / norm, 0, 255)), None

    adversarial, _ = jax.lax.scan(step, ctx.images, None, length=steps)
    return jax.lax.stop_gradient(adversarial), target


def _amkd(ctx: Context):
    """AMKD (2020), the simplest faithful reading (the article's details are not public): boundary samples from the
    teacher (`boundary_samples`), KL on them, and a triplet margin keeping the student's embedding of a boundary
    sample (anchor) closer to its clean source (positive) than to a batch example of the attack's target class
    (negative; examples without one are masked)."""
    k = ctx.loss.amkd
    logits, segments = ctx.student()
    total, parts = ctx.base(logits, ctx.teacher()[0])
    adversarial, target = boundary_samples(ctx, k.adv_steps, k.adv_step_size)
    adv_logits, adv_segments = ctx.student(adversarial)
    adv_kd = losses.kd_kl(adv_logits, ctx.teacher(adversarial)[0], ctx.loss.temperature)
    embed = ctx.module.projector
    anchor, positive = embed(pooled(adv_segments[-1])), embed(pooled(segments[-1]))
    same = ctx.labels[None, :] == target[:, None]  # (anchor, candidate negative)
    negative = positive[jnp.argmax(same, axis=1)]
    triplet = losses.triplet_margin(anchor, positive, negative, k.triplet_margin, where=jnp.any(same, 1))
    total = total + ctx.loss.kd_weight * adv_kd + k.triplet_weight * triplet
    return total, {**parts, "adv_kd": adv_kd, "triplet": triplet}, logits


def sampled_images(ctx: Context, steps: int, step_size: float):
    """Images the teacher classifies as a chosen class, drawn near the student's data (KD under distribution
    mismatch, simplest faithful reading): a mixup of two batch images plus noise, then `steps` signed-gradient
    steps of `step_size` pixels up log p_teacher(class) for a class drawn uniformly over every class (the dropped
    ones too). Returns (images, class, teacher confidence in it)."""
    noise_key, class_key, mix_key = jax.random.split(ctx.key, 3)
    start, _, _, _ = mixup(mix_key, ctx.images, ctx.targets, 1.0)
    start = jnp.clip(start + 16.0 * jax.random.normal(noise_key, start.shape), 0, 255)
    wanted = jax.random.randint(class_key, (start.shape[0],), 0, ctx.targets.shape[-1])

    def log_p(x):  # log p_teacher(wanted class), summed over the batch
        return jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(ctx.teacher_logits_fn(x)), wanted[:, None], -1))

    def step(x, _):
        return jnp.clip(x + step_size * jnp.sign(jax.grad(log_p)(x)), 0, 255), None

    images, _ = jax.lax.scan(step, start, None, length=steps)
    images = jax.lax.stop_gradient(images)
    confidence = jnp.take_along_axis(jax.nn.softmax(ctx.teacher(images)[0]), wanted[:, None], -1)[:, 0]
    return images, wanted, jax.lax.stop_gradient(confidence)


def _mismatch(ctx: Context):
    """KD under distribution mismatch (LNCS 2021): KD + `sample_weight` x the teacher-confidence-weighted KL on
    images sampled near the data (`sampled_images`)."""
    k = ctx.loss.mismatch
    logits, _ = ctx.student()
    total, parts = ctx.base(logits, ctx.teacher()[0])
    images, _, confidence = sampled_images(ctx, k.adv_steps, k.adv_step_size)
    sampled_logits, _ = ctx.student(images)
    sampled = losses.kd_kl(sampled_logits, ctx.teacher(images)[0], ctx.loss.temperature, weights=confidence)
    return total + k.sample_weight * sampled, {**parts, "sampled_kd": sampled}, logits


def _ssd_kd(ctx: Context):
    """SSD-KD (Medical Image Analysis 2023, from its authors' code): logit KD, relational KD of the penultimate
    features (25 x RKD distance + 50 x RKD angle), and a self-supervised task: each image also seen turned by a
    random multiple of 90 degrees, the student predicting the turn (a linear head) and matching the teacher on it."""
    k = ctx.loss.ssd_kd
    logits, segments = ctx.student()
    teacher_logits, teacher_segments = ctx.teacher()
    total, parts = ctx.base(logits, teacher_logits)
    s_emb, t_emb = pooled(segments[-1]), pooled(teacher_segments[-1])
    relation = 25.0 * losses.rkd_distance(s_emb, t_emb) + 50.0 * losses.rkd_angle(s_emb, t_emb)
    turns = jax.random.randint(ctx.key, (ctx.images.shape[0],), 0, 4)
    turned = rotate90(ctx.images, turns)
    turned_logits, turned_segments = ctx.student(turned)
    rotation = losses.cross_entropy(ctx.module.projector(pooled(turned_segments[-1])), turns)
    turned_kd = losses.kd_kl(turned_logits, ctx.teacher(turned)[0], ctx.loss.temperature)
    total = total + k.relation_weight * relation + k.ss_weight * (rotation + turned_kd)
    return total, {**parts, "relation": relation, "rotation": rotation, "rotated_kd": turned_kd}, logits


def _projector(size):
    """A linear map of the student's penultimate features to `size(build)` outputs."""

    def modules(b: Build) -> dict:
        return {"projector": linear(b.student_shapes[-1][-1], size(b), rngs=b.rngs, dtype=b.dtype)}

    return modules


SAMPLING = frozenset({"teacher", "randomness"})
ATTACK = {"adv_steps": "steps", "adv_step_size": "nonnegative"}  # attack steps, of this size in pixels
AMKD = Method(
    "amkd",
    "AMKD (2020): KD on boundary samples + triplet margin on embeddings",
    family="samples",
    objective=_amkd,
    knobs={"adv_steps": 5, "adv_step_size": 8.0, "triplet_weight": 1.0, "triplet_margin": 0.2, "embedding_size": 64},
    kinds={**ATTACK, "triplet_weight": "weight", "triplet_margin": "nonnegative", "embedding_size": "count"},
    tune="triplet_weight",
    grid=(0.1, 1.0),
    needs=SAMPLING,
    modules=_projector(lambda b: b.knobs.embedding_size),  # margin on L2-normalised embeddings of this size
)
MISMATCH = Method(
    "mismatch",
    "KD under distribution mismatch (LNCS 2021): KD on images sampled near the data and classified well by the teacher",
    family="samples",
    objective=_mismatch,
    knobs={"adv_steps": 5, "adv_step_size": 8.0, "sample_weight": 1.0},
    kinds={**ATTACK, "sample_weight": "weight"},
    tune="sample_weight",
    grid=(0.3, 1.0),
    needs=SAMPLING,
)
SSD_KD = Method(
    "ssd_kd",
    "SSD-KD (Medical Image Analysis 2023): KD + relational KD + a rotation task",
    family="samples",
    objective=_ssd_kd,
    knobs={"relation_weight": 1.0, "ss_weight": 1.0},  # relational KD; the rotation task
    kinds={"relation_weight": "weight", "ss_weight": "weight"},
    tune="relation_weight",
    grid=(0.1, 1.0),
    needs=SAMPLING,
    modules=_projector(lambda b: 4),  # the rotation head: 4 quarter turns
)
