"""AB and FSP, the methods RepDistiller runs in an init stage: the student's paired segments (through connectors,
identities where the shapes already match) learn the method's loss alone, `loss.<name>.weight` x it, for the first
`loss.<name>.init_epochs` epochs; then plain KD without it."""

from __future__ import annotations

import jax.numpy as jnp

from extkd_jax import losses
from extkd_jax.methods.base import Method
from extkd_jax.methods.context import Context


def _ab_loss(ctx: Context, mapped, paired):
    """AB: RepDistiller's layer weights 2^(k - n + 1) and its 3 / 1000 scale, margin `loss.ab.margin`."""
    n = len(mapped)
    feature = sum(
        2.0 ** (k - n + 1) * losses.activation_boundary(m, t, ctx.loss.ab.margin)
        for k, (m, t) in enumerate(zip(mapped, paired, strict=True))
    )
    return feature * 3.0 / 1000.0


def _fsp_loss(ctx: Context, mapped, paired):
    """FSP: the flow matrices between consecutive paired segments."""
    return losses.fsp(mapped, paired)


def _init_stage(name: str, feature_fn):
    def objective(ctx: Context):
        k = ctx.loss[name]
        logits, segments = ctx.student()
        teacher_logits, teacher_segments = ctx.teacher()
        kd_total, kd_parts = ctx.base(logits, teacher_logits)
        paired = [teacher_segments[t] for _, t in ctx.pairs]
        feature = feature_fn(ctx, ctx.mapped(segments), paired)
        total = jnp.where(ctx.epoch < k.init_epochs, k.weight * feature, kd_total)
        return total, {**kd_parts, name: feature}, logits

    objective.__doc__ = feature_fn.__doc__
    return objective


def _method(name: str, description: str, feature_fn, knobs=None, kinds=None) -> Method:
    return Method(
        name,
        description,
        family="zoo",
        objective=_init_stage(name, feature_fn),
        # weight: RepDistiller's sum of its layer losses; init_epochs: RepDistiller's init stage is 30 of 270 epochs
        knobs={"weight": 1.0, "init_epochs": 1.0, **(knobs or {})},
        kinds={"weight": "weight", "init_epochs": "nonnegative", **(kinds or {})},
        tune="init_epochs",
        grid="init_stage",
        needs=frozenset({"teacher"}),
        pairing="all",
        connectors=True,
        zoo=True,
    )


AB = _method(
    "ab",
    "activation boundaries (Heo et al. 2019): a feature-only init stage, then KD",
    _ab_loss,
    knobs={"margin": 1.0},
    kinds={"margin": "nonnegative"},
)
FSP = _method("fsp", "FSP (Yim et al. 2017): flow matrices between layers in an init stage, then KD", _fsp_loss)
