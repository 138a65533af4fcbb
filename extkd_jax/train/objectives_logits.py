"""The objectives of the logit and segment methods: CE, KD, FitNet / Extended-KD / AT, DKD, MKD, MTKD-SSR, PFKD
and PURF's teacher regulariser (what each computes: train/objectives.py's table)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from extkd_jax import losses
from extkd_jax.data.mixing import mixup
from extkd_jax.train.objective_context import Context, pooled


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


def _purf(ctx: Context):
    """PURF (Applied Soft Computing 2024), the simplest faithful reading: while training a teacher, penalise the
    relative change of every segment under Gaussian input noise of `purf_sigma` pixels (`losses.smoothness`)."""
    logits, segments = ctx.student()
    noisy = ctx.images + ctx.loss.purf_sigma * jax.random.normal(ctx.key, ctx.images.shape)
    _, noisy_segments = ctx.student(noisy)
    ce, smooth = ctx.ce(logits), losses.smoothness(segments, noisy_segments)
    return ce + ctx.loss.purf_weight * smooth, {"ce": ce, "smoothness": smooth}, logits


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
    "pfkd": _pfkd,
}
