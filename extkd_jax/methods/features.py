"""The segment methods on top of KD: FitNet (the middle segment), Extended-KD (every segment), both through learned
connectors, and attention transfer."""

from __future__ import annotations

from extkd_jax import losses
from extkd_jax.methods.base import Method
from extkd_jax.methods.context import Context


def _mse_of(name: str):
    """KD + `loss.<name>.weight` x the MSE of the paired segments through their connectors (FitNet, Extended-KD)."""

    def objective(ctx: Context):
        logits, segments = ctx.student()
        teacher_logits, teacher_segments = ctx.teacher()
        return (
            *losses.extended_kd_loss(
                logits,
                teacher_logits,
                ctx.targets,
                ctx.mapped(segments),
                [teacher_segments[t] for _, t in ctx.pairs],
                temperature=ctx.loss.temperature,
                ce_weight=ctx.loss.ce_weight,
                kd_weight=ctx.loss.kd_weight,
                segment_weight=ctx.loss[name].weight,
                label_smoothing=ctx.loss.label_smoothing,
            ),
            logits,
        )

    return objective


def _at(ctx: Context):
    """KD + `loss.at.weight` (AT's beta) x attention transfer of the paired segments, with exponent `loss.at.p`."""
    logits, segments = ctx.student()
    teacher_logits, teacher_segments = ctx.teacher()
    total, parts = ctx.base(logits, teacher_logits)
    paired_t = [teacher_segments[t] for _, t in ctx.pairs]
    at = losses.attention_transfer([segments[s] for s, _ in ctx.pairs], paired_t, p=ctx.loss.at.p)
    return total + ctx.loss.at.weight * at, {**parts, "at": at}, logits


SEGMENT_GRID = (0.1, 1.0)
FITNET = Method(
    "fitnet",
    "FitNet (Romero et al. 2015): KD + MSE of the middle segment through a connector",
    family="features",
    objective=_mse_of("fitnet"),
    knobs={"weight": 1.0},
    kinds={"weight": "weight"},
    tune="weight",
    grid=SEGMENT_GRID,
    needs=frozenset({"teacher"}),
    pairing="middle",
    connectors=True,
)
AT = Method(
    "at",
    "attention transfer (Zagoruyko & Komodakis 2017) + KD",
    family="features",
    objective=_at,
    # AT's beta at RepDistiller's `-b 1000` (our per-example mean over positions is its `.pow(2).mean()`), its
    # tenth in the grid; the exponent of the attention maps
    knobs={"weight": 1000.0, "p": 2.0},
    kinds={"weight": "weight", "p": "positive"},
    tune="weight",
    grid=(100.0, 1000.0),
    needs=frozenset({"teacher", "feature_maps"}),
    pairing="all",
)
EXTENDED_KD = Method(
    "extended_kd",
    "Extended-KD (Yuan & Pan 2019): KD + MSE of every segment through connectors",
    family="features",
    objective=_mse_of("extended_kd"),
    knobs={"weight": 1.0},
    kinds={"weight": "weight"},
    tune="weight",
    grid=SEGMENT_GRID,
    needs=frozenset({"teacher"}),
    pairing="all",
    connectors=True,
)
