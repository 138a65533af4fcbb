"""The package's methods, registered in this order (the order of `extkd reproduce`'s method lists and of the
README's method table). A method is one object in one file: its family's (logits, features, stages, samples,
relations, init_stage, roles) or its own, where it owns a module (vid, ft, reviewkd, ofd, crd)."""

from __future__ import annotations

from extkd_jax.methods import crd, features, ft, init_stage, logits, ofd, relations, reviewkd, roles, samples, stages
from extkd_jax.methods import vid as vid_

BUILTIN = (
    logits.CE,
    logits.PURF,
    roles.SCRATCH_FULL,
    roles.SCRATCH_TRANSFER,
    logits.KD,
    features.FITNET,
    features.AT,
    features.EXTENDED_KD,
    logits.DKD,
    logits.MKD,
    stages.MTKD_SSR,
    samples.AMKD,
    logits.PFKD,
    samples.MISMATCH,
    roles.PURF_KD,
    samples.SSD_KD,
    roles.KD_MIXUP,
    roles.KD_CUTMIX,
    roles.KD_AUTO,
    # the standard KD zoo (RepDistiller / mdistiller baselines), each added to KD unless it replaces the KL
    relations.PKT,
    relations.RKD,
    relations.SP,
    relations.CC,
    relations.NST,
    logits.DIST,
    logits.LS_KD,
    logits.MLKD,
    vid_.VID,
    init_stage.AB,
    init_stage.FSP,
    ft.FT,
    reviewkd.REVIEWKD,
    ofd.OFD,
    crd.CRD,
    relations.KDSVD,
)
