"""The KD zoo's relation and feature-statistics methods (RepDistiller's / mdistiller's baselines), each KD plus
`loss.<name>.weight` x its loss where RepDistiller places it: PKT, RKD and CC on the penultimate features (the last
segment pooled), SP on the last segment, NST and KDSVD on the paired segments."""

from __future__ import annotations

from extkd_jax import losses
from extkd_jax.methods.base import Method
from extkd_jax.methods.context import Context, pooled


def _plus_kd(name: str, extra_fn):
    """KD + `loss.<name>.weight` x `extra_fn(ctx, segments, teacher_segments)`."""

    def objective(ctx: Context):
        logits, segments = ctx.student()
        teacher_logits, teacher_segments = ctx.teacher()
        total, parts = ctx.base(logits, teacher_logits)
        extra = extra_fn(ctx, segments, teacher_segments)
        return total + ctx.loss[name].weight * extra, {**parts, name: extra}, logits

    objective.__doc__ = extra_fn.__doc__
    return objective


def _pkt(ctx, segments, teacher_segments):
    """PKT on the penultimate features."""
    return losses.pkt(pooled(segments[-1]), pooled(teacher_segments[-1]))


def _rkd(ctx, segments, teacher_segments):
    """RKD (25 x distance + 50 x angle inside) on the penultimate features."""
    return losses.rkd(pooled(segments[-1]), pooled(teacher_segments[-1]))


def _cc(ctx, segments, teacher_segments):
    """Correlation congruence (RBF kernel of `loss.cc.gamma` on unit embeddings) on the penultimate features."""
    return losses.correlation_congruence(pooled(segments[-1]), pooled(teacher_segments[-1]), ctx.loss.cc.gamma)


def _sp(ctx, segments, teacher_segments):
    """Similarity-preserving loss on the last segment."""
    return losses.similarity_preserving(segments[-1], teacher_segments[-1])


def needs_maps(ctx: Context, segments, name: str) -> None:
    if any(segments[s].ndim != 4 for s, _ in ctx.pairs):
        raise ValueError(f"loss.name={name!r} needs feature maps (H, W, C): the student's segments are vectors")


def _nst(ctx, segments, teacher_segments):
    """Neuron selectivity transfer, summed over the paired segments."""
    needs_maps(ctx, segments, "nst")
    return sum(losses.nst(segments[s], teacher_segments[t]) for s, t in ctx.pairs)


def _kdsvd(ctx, segments, teacher_segments):
    """RBF relations of the top `loss.kdsvd.k` singular vectors of consecutive paired segments."""
    needs_maps(ctx, segments, "kdsvd")
    paired = [segments[s] for s, _ in ctx.pairs], [teacher_segments[t] for _, t in ctx.pairs]
    return losses.kdsvd(*paired, k=int(ctx.loss.kdsvd.k))


def _zoo(name, description, weight, grid, extra_fn, knobs=None, kinds=None, **fields) -> Method:
    """A zoo method: KD + weight x its loss; `weight` RepDistiller's (its `-b` on CIFAR-100), `grid` the two-value
    grid of the `:zoo` comparison (that weight and a tenth of it)."""
    return Method(
        name,
        description,
        family="zoo",
        objective=_plus_kd(name, extra_fn),
        knobs={"weight": weight, **(knobs or {})},
        kinds={"weight": "weight", **(kinds or {})},
        tune="weight",
        grid=grid,
        zoo=True,
        **{"needs": frozenset({"teacher"}), **fields},
    )


PKT = _zoo("pkt", "PKT (Passalis & Tefas 2018): KD + probabilistic transfer of feature similarities", 30000.0,
           (3000.0, 30000.0), _pkt)  # fmt: skip
RKD = _zoo("rkd", "RKD (Park et al. 2019): KD + distances and angles between examples' features", 1.0, (0.1, 1.0),
           _rkd)  # fmt: skip
SP = _zoo("sp", "similarity-preserving KD (Tung & Mori 2019): KD + batch similarity matrices", 3000.0,
          (300.0, 3000.0), _sp)  # fmt: skip
# cc: our kernel form (RepDistiller's weight 0.02 is for another)
CC = _zoo("cc", "correlation congruence (Peng et al. 2019): KD + RBF correlations between examples", 10.0,
          (1.0, 10.0), _cc, knobs={"gamma": 0.4}, kinds={"gamma": "positive"})  # fmt: skip
NST = _zoo("nst", "neuron selectivity transfer (Huang & Wang 2017): KD + MMD of channel maps", 50.0, (5.0, 50.0),
           _nst, needs=frozenset({"teacher", "feature_maps"}), pairing="all")  # fmt: skip
# kdsvd: k of the teacher's singular vectors per segment (the student's: k + 3); mdistiller's FEAT_WEIGHT
KDSVD = _zoo("kdsvd", "KDSVD (Lee et al. 2018): KD + RBF relations of singular vectors between stages", 1.0,
             (0.1, 1.0), _kdsvd, knobs={"k": 1}, kinds={"k": "count"}, needs=frozenset({"teacher", "feature_maps"}),
             pairing="all")  # fmt: skip
