"""The objectives of the KD zoo (`configs.base.ZOO_METHODS`: RepDistiller's / mdistiller's baselines), each KD plus
the method's loss where RepDistiller places it, or DIST / LS-KD / MLKD instead of the KL; the modules some of them
train (VID's regressors, FT's paraphraser, ReviewKD's fusion, OFD's margins, CRD's memory banks) are the Student's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from extkd_jax import losses
from extkd_jax.configs.base import ZOO_METHODS
from extkd_jax.losses.zoo import MLKD_TEMPERATURES
from extkd_jax.losses.zoo_features import match_spatial
from extkd_jax.train.objective_context import Context, pooled

ZOO_LOSSES = ZOO_METHODS  # each zoo method's objective bears its name
INIT_STAGE_LOSSES = ("ab", "fsp")  # a feature-only first stage, then plain KD (RepDistiller's `init`)


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


OBJECTIVES = {name: _zoo for name in ZOO_LOSSES}
