"""The training objectives, by `loss.name`: each a function of a `Context` that runs the networks it needs on the
inputs it needs (clean, mixed, adversarial, sampled, rotated) and returns (total, unweighted parts).

| loss.name   | total (on top of ce_weight * CE and, where there is a teacher, kd_weight * T^2 KL)               |
|-------------|--------------------------------------------------------------------------------------------------|
| ce, purf    | CE; purf adds purf_weight * smoothness of the segments under input noise (a teacher's regulariser) |
| kd          | -                                                                                                |
| fitnet      | segment_weight * MSE(middle segment through a connector)                                         |
| extended_kd | segment_weight * sum_k MSE(segment k through its connector)                                      |
| at          | segment_weight * attention transfer(segments)                                                    |
| dkd         | CE + min(1, epoch / dkd_warmup_epochs) * DKD(alpha, beta, T) (no plain KL)                       |
| mkd         | student on a mixup of two images; CE and KL mixed at the loss level against the two sources      |
| mtkd_ssr    | segment_weight * channel KD per stage + stage heads taught by the teacher (SRD) and by the next    |
|             | stage (CRD)                                                                                      |
| amkd        | KL on boundary samples (a targeted attack on the teacher) + triplet_weight * triplet margin       |
| pfkd        | CE against the teacher's labels + feature_weight * feature-temperature KL of penultimate features  |
| mismatch    | sample_weight * confidence-weighted KL on images sampled near the data and pushed by the teacher   |
| ssd_kd      | relation_weight * RKD(penultimate) + ss_weight * (rotation prediction + KL on rotated images)     |
| pkt, rkd, cc| <name>_weight * the loss on the penultimate features (the zoo, RepDistiller's placement)          |
| sp          | sp_weight * similarity-preserving loss on the last segment                                       |
| nst         | nst_weight * sum over paired segments of neuron selectivity transfer                             |
| dist, ls_kd | CE + kd_weight * DIST (dist_beta, dist_gamma, T) or logit-standardised KD, instead of the KL     |
| mlkd        | CE + kd_weight * multi-level logit KD at T, 2, 3, 5, 6 (instance, class and batch level)          |
| vid         | vid_weight * sum over paired segments of VID's Gaussian NLL through learned regressors            |
| ab, fsp     | for the first init_epochs epochs only <name>_weight * activation-boundary / FSP loss of the paired  |
|             | segments (through connectors); then CE + KL alone (RepDistiller's init stage)                    |
| ft          | for the first init_epochs epochs the paraphraser learns to reconstruct the teacher's last segment;  |
|             | then ft_weight * factor transfer (translator's factor vs the frozen paraphraser's)               |
| reviewkd    | min(1, epoch / review_warmup_epochs) * review_weight * hierarchical context loss of the student's   |
|             | segments and pooled features, fused by attention (ABF), against the teacher's                    |
| ofd         | ofd_weight * sum_k 2^(k-n+1) * margin-ReLU partial L2 of the pre-activation taps (connectors)     |
| crd         | contrast_weight * NCE of the student's and the teacher's embedded penultimate features, each      |
|             | against the other network's momentum memory bank (positive: the example itself; negatives: other |
|             | classes)                                                                                         |
| kdsvd       | kdsvd_weight * RBF relations of the top singular vectors of consecutive paired segments          |

Each method's choices where its paper leaves them open are in its function's docstring and docs/methods.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from extkd_jax import losses
from extkd_jax.configs.base import ZOO_METHODS
from extkd_jax.data.mixing import mixup, rotate90
from extkd_jax.losses.zoo import MLKD_TEMPERATURES
from extkd_jax.losses.zoo_features import match_spatial
from extkd_jax.models import forward_with_segments

ZOO_LOSSES = ZOO_METHODS  # each zoo method's objective bears its name
TEACHER_LOSSES = (
    "kd",
    "fitnet",
    "extended_kd",
    "at",
    "dkd",
    "mkd",
    "mtkd_ssr",
    "amkd",
    "pfkd",
    "mismatch",
    "ssd_kd",
    *ZOO_LOSSES,
)
# losses that pair student and teacher segments
SEGMENT_LOSSES = (
    "fitnet",
    "extended_kd",
    "at",
    "mtkd_ssr",
    "nst",
    "vid",
    "ab",
    "fsp",
    "ft",
    "reviewkd",
    "ofd",
    "kdsvd",
)
CONNECTOR_LOSSES = ("fitnet", "extended_kd", "mtkd_ssr", "ab", "fsp", "ofd")  # ... through learned connectors
PREACT_LOSSES = ("ofd",)  # read the networks' pre-activation taps instead of their segments
INIT_STAGE_LOSSES = ("ab", "fsp")  # a feature-only first stage, then plain KD (RepDistiller's `init`)
LOSS_NAMES = ("ce", "purf", *TEACHER_LOSSES)


def pooled(segment: jax.Array) -> jax.Array:
    """The penultimate features of a segment: the global average over its spatial axes (a vector stays)."""
    return (
        segment if segment.ndim == 2 else jnp.mean(segment.astype(jnp.float32), axis=tuple(range(1, segment.ndim - 1)))
    )


@dataclasses.dataclass
class Context:
    """What an objective may use: the batch, the networks as functions of pixel images, the student's extras."""

    loss: Any  # the `loss` block of the config
    images: jax.Array  # pixel values (float), augmented (and mixed, when data.augment mixes)
    labels: jax.Array  # integer labels
    targets: jax.Array  # soft targets: one-hot, or mixed
    key: jax.Array  # the objective's randomness (sampling, attacks, rotations)
    epoch: jax.Array
    module: Any  # the Student wrapper: model, connectors, heads, projector
    pairs: tuple
    run_student: Callable  # pixel images -> (logits, segments), train mode
    run_teacher: Callable | None  # pixel images -> (logits, segments), frozen
    teacher_logits_fn: Callable | None  # pixel images -> logits (differentiable in the images: attacks)
    indices: jax.Array | None = None  # the batch's positions in the transfer set (device pipeline), for crd
    _cache: dict = dataclasses.field(default_factory=dict)

    def student(self, images: jax.Array | None = None):
        if images is not None:
            return self.run_student(images)
        if "student" not in self._cache:
            self._cache["student"] = self.run_student(self.images)
        return self._cache["student"]

    def teacher(self, images: jax.Array | None = None):
        if images is not None:
            return self.run_teacher(images)
        if "teacher" not in self._cache:
            self._cache["teacher"] = self.run_teacher(self.images)
        return self._cache["teacher"]

    def ce(self, logits: jax.Array) -> jax.Array:
        return losses.cross_entropy(logits, self.targets, self.loss.label_smoothing)

    def base(self, logits: jax.Array, teacher_logits: jax.Array) -> tuple[jax.Array, dict]:
        """ce_weight * CE + kd_weight * T^2 KL, and the two parts."""
        ce, kd = self.ce(logits), losses.kd_kl(logits, teacher_logits, self.loss.temperature)
        return self.loss.ce_weight * ce + self.loss.kd_weight * kd, {"ce": ce, "kd": kd}

    def mapped(self, segments) -> list[jax.Array]:
        """The paired student segments, through their connectors when the method has them."""
        connectors = nnx.view(self.module.connectors, use_running_average=False, raise_if_not_found=False)
        return [connectors[j](segments[s]) if len(connectors) else segments[s] for j, (s, _) in enumerate(self.pairs)]


def _ce(ctx: Context):
    logits, _ = ctx.student()
    ce = ctx.ce(logits)
    return ce, {"ce": ce}, logits


def _kd(ctx: Context):
    logits, _ = ctx.student()
    total, parts = ctx.base(logits, ctx.teacher()[0])
    return total, parts, logits


def _segments(ctx: Context):
    logits, segments = ctx.student()
    teacher_logits, teacher_segments = ctx.teacher()
    paired_t = [teacher_segments[t] for _, t in ctx.pairs]
    if ctx.loss.name == "at":
        total, parts = ctx.base(logits, teacher_logits)
        at = losses.attention_transfer([segments[s] for s, _ in ctx.pairs], paired_t, p=ctx.loss.at_p)
        return total + ctx.loss.segment_weight * at, {**parts, "at": at}, logits
    total, parts = losses.extended_kd_loss(
        logits,
        teacher_logits,
        ctx.targets,
        ctx.mapped(segments),
        paired_t,
        temperature=ctx.loss.temperature,
        ce_weight=ctx.loss.ce_weight,
        kd_weight=ctx.loss.kd_weight,
        segment_weight=ctx.loss.segment_weight,
        label_smoothing=ctx.loss.label_smoothing,
    )
    return total, parts, logits


def _dkd(ctx: Context):
    logits, _ = ctx.student()
    c = ctx.loss
    decoupled = losses.dkd(logits, ctx.teacher()[0], ctx.labels, c.dkd_alpha, c.dkd_beta, c.temperature)
    ramp = jnp.minimum(1.0, ctx.epoch / c.dkd_warmup_epochs) if c.dkd_warmup_epochs > 0 else 1.0
    ce = ctx.ce(logits)
    return c.ce_weight * ce + ramp * decoupled, {"ce": ce, "dkd": decoupled}, logits


def _mkd(ctx: Context):
    """MKD (Algorithms 2022): the student sees ``lam x_i + (1 - lam) x_j`` (lam ~ Beta(mix_alpha, mix_alpha)); the
    teacher sees the clean images, and the KL is mixed at the loss level (`losses.mixture_kd`); CE with the mixed
    labels."""
    images, targets, lam, perm = mixup(jax.random.fold_in(ctx.key, 0), ctx.images, ctx.targets, ctx.loss.mix_alpha)
    logits, _ = ctx.student(images)
    teacher_logits = ctx.teacher()[0]
    ce = losses.cross_entropy(logits, targets, ctx.loss.label_smoothing)
    kd = losses.mixture_kd(logits, teacher_logits, teacher_logits[perm], lam, ctx.loss.temperature)
    return ctx.loss.ce_weight * ce + ctx.loss.kd_weight * kd, {"ce": ce, "kd": kd}, logits


def _mtkd_ssr(ctx: Context):
    """MTKD-SSR (IJCV 2023), from its abstract: SCD = channel-wise KD of every stage through a connector (for an
    MLP's vector segments, the KL of the whole vector as a distribution); SRD =
    a head (average pool + linear) on each student stage taught by the teacher's final response; CRD = each head
    also taught by the next stage's head, the last by the final logits (stop-gradient on the teachers)."""
    logits, segments = ctx.student()
    teacher_logits, teacher_segments = ctx.teacher()
    total, parts = ctx.base(logits, teacher_logits)
    mapped = ctx.mapped(segments)
    # a vector segment (an MLP's) has one position per channel: its channels form the distribution instead
    scd = sum(
        (losses.channel_distillation if m.ndim == 4 else losses.feature_kl)(
            m, teacher_segments[t], ctx.loss.temperature
        )
        for m, (_, t) in zip(mapped, ctx.pairs, strict=True)
    )
    responses = [head(pooled(segments[k])) for k, head in enumerate(ctx.module.heads)]
    srd = sum(losses.kd_kl(r, teacher_logits, ctx.loss.temperature) for r in responses)
    reviewers = [*responses[1:], logits]
    crd = sum(
        losses.kd_kl(r, jax.lax.stop_gradient(nxt), ctx.loss.temperature)
        for r, nxt in zip(responses, reviewers, strict=True)
    )
    total = total + ctx.loss.segment_weight * scd + ctx.loss.srd_weight * srd + ctx.loss.crd_weight * crd
    return total, {**parts, "scd": scd, "srd": srd, "crd": crd}, logits


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
    logits, segments = ctx.student()
    total, parts = ctx.base(logits, ctx.teacher()[0])
    adversarial, target = boundary_samples(ctx, ctx.loss.adv_steps, ctx.loss.adv_step_size)
    adv_logits, adv_segments = ctx.student(adversarial)
    adv_kd = losses.kd_kl(adv_logits, ctx.teacher(adversarial)[0], ctx.loss.temperature)
    embed = ctx.module.projector
    anchor, positive = embed(pooled(adv_segments[-1])), embed(pooled(segments[-1]))
    same = ctx.labels[None, :] == target[:, None]  # (anchor, candidate negative)
    negative = positive[jnp.argmax(same, axis=1)]
    triplet = losses.triplet_margin(anchor, positive, negative, ctx.loss.triplet_margin, where=jnp.any(same, 1))
    total = total + ctx.loss.kd_weight * adv_kd + ctx.loss.triplet_weight * triplet
    return total, {**parts, "adv_kd": adv_kd, "triplet": triplet}, logits


def _pfkd(ctx: Context):
    """Penultimate-feature KD with teacher labels (Applied Sciences 2024), the simplest faithful reading: the CE
    target is the teacher's predicted class, not the data set's label; the penultimate features are matched as
    distributions at a feature temperature (`losses.feature_kl`) through a linear projector; plus the logit KL."""
    logits, segments = ctx.student()
    teacher_logits, teacher_segments = ctx.teacher()
    ce = losses.cross_entropy(logits, jnp.argmax(teacher_logits, -1), ctx.loss.label_smoothing)
    kd = losses.kd_kl(logits, teacher_logits, ctx.loss.temperature)
    feature = losses.feature_kl(
        ctx.module.projector(pooled(segments[-1])), pooled(teacher_segments[-1]), ctx.loss.feature_temperature
    )
    total = ctx.loss.ce_weight * ce + ctx.loss.kd_weight * kd + ctx.loss.feature_weight * feature
    return total, {"ce": ce, "kd": kd, "feature": feature}, logits


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
    logits, _ = ctx.student()
    total, parts = ctx.base(logits, ctx.teacher()[0])
    images, _, confidence = sampled_images(ctx, ctx.loss.adv_steps, ctx.loss.adv_step_size)
    sampled_logits, _ = ctx.student(images)
    sampled = losses.kd_kl(sampled_logits, ctx.teacher(images)[0], ctx.loss.temperature, weights=confidence)
    return total + ctx.loss.sample_weight * sampled, {**parts, "sampled_kd": sampled}, logits


def _purf(ctx: Context):
    """PURF (Applied Soft Computing 2024), the simplest faithful reading: while training a teacher, penalise the
    relative change of every segment under Gaussian input noise of `purf_sigma` pixels (`losses.smoothness`)."""
    logits, segments = ctx.student()
    noisy = ctx.images + ctx.loss.purf_sigma * jax.random.normal(ctx.key, ctx.images.shape)
    _, noisy_segments = ctx.student(noisy)
    ce, smooth = ctx.ce(logits), losses.smoothness(segments, noisy_segments)
    return ce + ctx.loss.purf_weight * smooth, {"ce": ce, "smoothness": smooth}, logits


def _ssd_kd(ctx: Context):
    """SSD-KD (Medical Image Analysis 2023, from its authors' code): logit KD, relational KD of the penultimate
    features (25 x RKD distance + 50 x RKD angle), and a self-supervised task: each image also seen turned by a
    random multiple of 90 degrees, the student predicting the turn (a linear head) and matching the teacher on it."""
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
    total = total + ctx.loss.relation_weight * relation + ctx.loss.ss_weight * (rotation + turned_kd)
    return total, {**parts, "relation": relation, "rotation": rotation, "rotated_kd": turned_kd}, logits


def _zoo(ctx: Context):
    """The KD zoo (losses.zoo): KD plus `<name>_weight` x the method's loss where RepDistiller places it (pkt, rkd,
    cc: the penultimate features, the last segment pooled; sp: the last segment; nst: every paired segment); dist
    and ls_kd replace the KL (weighted by kd_weight) next to the CE."""
    c = ctx.loss
    logits, segments = ctx.student()
    teacher_logits, teacher_segments = ctx.teacher()
    if c.name in ("dist", "ls_kd", "mlkd"):
        ce = ctx.ce(logits)
        if c.name == "dist":
            kd = losses.dist(logits, teacher_logits, c.dist_beta, c.dist_gamma, c.temperature)
        elif c.name == "mlkd":
            kd = losses.mlkd(
                logits, teacher_logits, (c.temperature, *MLKD_TEMPERATURES), batch_invariant=c.mlkd_batch_invariant
            )
        else:
            kd = losses.logit_standardized_kd(logits, teacher_logits, c.temperature)
        return c.ce_weight * ce + c.kd_weight * kd, {"ce": ce, c.name: kd}, logits
    total, parts = ctx.base(logits, teacher_logits)
    if c.name == "ft":
        return (*_factor_transfer(ctx, total, parts, segments, teacher_segments), logits)
    if c.name == "reviewkd":
        return (*_review(ctx, total, parts, segments, teacher_segments), logits)
    if c.name == "ofd":  # `segments` are the pre-activation taps here (PREACT_LOSSES)
        mapped, n = ctx.mapped(segments), len(ctx.pairs)
        margins = ctx.module.projector.values()
        ofd = sum(
            2.0 ** (k - n + 1) * losses.ofd(m, teacher_segments[t], margins[k])
            for k, (m, (_, t)) in enumerate(zip(mapped, ctx.pairs, strict=True))
        )
        return total + c.ofd_weight * ofd, {**parts, "ofd": ofd}, logits
    if c.name in INIT_STAGE_LOSSES:
        return (*_init_stage(ctx, total, parts, segments), logits)
    if c.name == "crd":
        return (*_crd(ctx, total, parts, segments, teacher_segments), logits)
    s_emb, t_emb = pooled(segments[-1]), pooled(teacher_segments[-1])
    if c.name == "pkt":
        extra = losses.pkt(s_emb, t_emb)
    elif c.name == "rkd":
        extra = losses.rkd(s_emb, t_emb)
    elif c.name == "cc":
        extra = losses.correlation_congruence(s_emb, t_emb, c.cc_gamma)
    elif c.name == "sp":
        extra = losses.similarity_preserving(segments[-1], teacher_segments[-1])
    elif c.name == "vid":
        extra = 0.0
        for regressor, (s, t) in zip(ctx.module.connectors, ctx.pairs, strict=True):
            student, teacher = match_spatial(segments[s], teacher_segments[t])
            extra = extra + losses.vid(regressor(student), teacher, regressor.log_scale[...], VID_EPS)
    elif c.name == "kdsvd":
        if any(segments[s].ndim != 4 for s, _ in ctx.pairs):
            raise ValueError("loss.name='kdsvd' needs feature maps (H, W, C): the student's segments are vectors")
        paired = [segments[s] for s, _ in ctx.pairs], [teacher_segments[t] for _, t in ctx.pairs]
        extra = losses.kdsvd(*paired, k=int(c.kdsvd_k))
    else:  # nst
        if any(segments[s].ndim != 4 for s, _ in ctx.pairs):
            raise ValueError("loss.name='nst' needs feature maps (H, W, C): the student's segments are vectors")
        extra = sum(losses.nst(segments[s], teacher_segments[t]) for s, t in ctx.pairs)
    return total + c[f"{c.name}_weight"] * extra, {**parts, c.name: extra}, logits


VID_EPS = 1e-5  # VID's variance floor (RepDistiller's eps)


def _init_stage(ctx: Context, kd_total, kd_parts, segments):
    """AB and FSP as RepDistiller runs them: an init stage in which the student's segments (through the connectors,
    identities where the shapes already match) learn the method's loss alone, `<name>_weight` x it, for the first
    `loss.init_epochs` epochs, then plain KD without it. AB: RepDistiller's layer weights 2^(k - n + 1) and its
    3 / 1000 scale; FSP: the flow matrices between consecutive paired segments."""
    c = ctx.loss
    mapped = ctx.mapped(segments)
    teacher_segments = ctx.teacher()[1]
    paired = [teacher_segments[t] for _, t in ctx.pairs]
    if c.name == "ab":
        n = len(mapped)
        feature = sum(
            2.0 ** (k - n + 1) * losses.activation_boundary(m, t, c.ab_margin)
            for k, (m, t) in enumerate(zip(mapped, paired, strict=True))
        )
        feature = feature * 3.0 / 1000.0
    else:
        feature = losses.fsp(mapped, paired)
    total = jnp.where(ctx.epoch < c.init_epochs, c[f"{c.name}_weight"] * feature, kd_total)
    return total, {**kd_parts, c.name: feature}


def _factor_transfer(ctx: Context, kd_total, kd_parts, segments, teacher_segments):
    """FT (Kim et al. 2018) as RepDistiller runs it, on the last segments: for the first `loss.init_epochs` epochs
    only the paraphraser learns, to reconstruct the teacher's map (MSE); then KD + `ft_weight` x the factor transfer
    loss between the translator's output and the paraphraser's code, the paraphraser frozen (no gradient)."""
    c = ctx.loss
    ((s, t),) = ctx.pairs
    teacher_map = jax.lax.stop_gradient(teacher_segments[t].astype(jnp.float32))
    code, reconstruction = ctx.module.projector(teacher_map)
    rebuild = jnp.mean(jnp.square(reconstruction - teacher_map))
    translator = nnx.view(ctx.module.connectors[0], use_running_average=False, raise_if_not_found=False)
    ft = losses.factor_transfer(translator(segments[s]), jax.lax.stop_gradient(code))
    total = jnp.where(ctx.epoch < c.init_epochs, rebuild, kd_total + c.ft_weight * ft)
    return total, {**kd_parts, "ft": ft, "reconstruction": rebuild}


def _review(ctx: Context, kd_total, kd_parts, segments, teacher_segments):
    """ReviewKD (Chen et al. 2021, mdistiller's form) on top of KD: the student's paired segments and its pooled
    features (a 1x1 map), fused deepest first by the ABF chain (`Student.projector`), against the teacher's paired
    segments and pooled features by the hierarchical context loss, ramped in over `review_warmup_epochs`."""
    c = ctx.loss

    def features(maps, idx):
        return [maps[i] for i in idx] + [pooled(maps[-1])[:, None, None, :]]

    student = features(segments, [s for s, _ in ctx.pairs])
    teacher = features(teacher_segments, [t for _, t in ctx.pairs])
    fusion = nnx.view(ctx.module.projector, use_running_average=False, raise_if_not_found=False)
    review = losses.hierarchical_context(fusion(student, [t.shape[1] for t in teacher]), teacher)
    ramp = jnp.minimum(1.0, ctx.epoch / c.review_warmup_epochs) if c.review_warmup_epochs > 0 else 1.0
    return kd_total + ramp * c.review_weight * review, {**kd_parts, "review": review}


def _crd(ctx: Context, kd_total, kd_parts, segments, teacher_segments):
    """CRD (Tian et al. 2020) as RepDistiller runs it, on top of KD: both penultimate features embedded (linear heads,
    unit rows); the student's against the teacher's memory bank and the teacher's against the student's, each row
    scored with its own example (positive) and `contrast_negatives` examples of other classes, exp(score / T)
    divided by a constant fixed on the first step (mean score x set size), NCE loss; then both banks move their
    batch rows towards the new embeddings (momentum). Needs the batch's positions in the transfer set."""
    c = ctx.loss
    if ctx.indices is None:
        raise ValueError(
            "loss.name='crd' needs each batch's positions in the transfer set, which only data.pipeline='device' "
            "with replicated placement provides"
        )
    head = ctx.module.projector
    v_s = losses.unit_rows(head.embed_student(pooled(segments[-1])))
    v_t = losses.unit_rows(head.embed_teacher(pooled(teacher_segments[-1])))
    negatives = losses.sample_negatives(
        ctx.key, ctx.labels, head.order[...], head.class_start[...], head.class_count[...], c.contrast_negatives
    )
    contrast = jnp.concatenate([ctx.indices[:, None].astype(negatives.dtype), negatives], axis=1)
    n = head.num_data
    scores_s = losses.contrast_scores(v_s, head.memory_teacher[...], contrast, c.contrast_temperature)
    scores_t = losses.contrast_scores(v_t, head.memory_student[...], contrast, c.contrast_temperature)
    first = jax.lax.stop_gradient(jnp.stack([jnp.mean(scores_s), jnp.mean(scores_t)]) * n)
    z = jnp.where(head.normalisers[...] < 0, first, head.normalisers[...])
    contrast_loss = losses.crd_nce(scores_s / z[0], n) + losses.crd_nce(scores_t / z[1], n)
    head.normalisers[...] = z
    head.memory_student[...] = losses.momentum_update(head.memory_student[...], ctx.indices, v_s, c.contrast_momentum)
    head.memory_teacher[...] = losses.momentum_update(head.memory_teacher[...], ctx.indices, v_t, c.contrast_momentum)
    return kd_total + c.contrast_weight * contrast_loss, {**kd_parts, "contrast": contrast_loss}


OBJECTIVES = {
    "ce": _ce,
    "purf": _purf,
    "kd": _kd,
    "fitnet": _segments,
    "extended_kd": _segments,
    "at": _segments,
    "dkd": _dkd,
    "mkd": _mkd,
    "mtkd_ssr": _mtkd_ssr,
    "amkd": _amkd,
    "pfkd": _pfkd,
    "mismatch": _mismatch,
    "ssd_kd": _ssd_kd,
    **{name: _zoo for name in ZOO_LOSSES},
}


def objective(ctx: Context) -> tuple[jax.Array, dict, jax.Array]:
    """(total, unweighted parts, the student's logits on the batch) of `ctx.loss.name`."""
    return OBJECTIVES[ctx.loss.name](ctx)


def run_student_fn(module, normalize, key, taps: str = "segments"):
    """pixel images -> (logits, segments or pre-activation taps) of the student model in train mode (dropout keys
    from `key`)."""
    calls = {"n": 0}

    def run(images):
        calls["n"] += 1  # each call its own dropout stream; the first one `key` itself
        rngs = nnx.Rngs(dropout=key if calls["n"] == 1 else jax.random.fold_in(key, calls["n"]))
        return forward_with_segments(module.model, normalize(images), train=True, rngs=rngs, taps=taps)

    return run
