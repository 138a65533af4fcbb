"""OFD (Heo et al. 2019): KD + the margin-ReLU partial L2 of the networks' pre-activation taps, the student's through
connectors, each above the teacher's per-channel margins (`Margins`, from the BN before each tap)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from extkd_jax import losses
from extkd_jax.methods.base import Build, Method
from extkd_jax.methods.context import Context
from extkd_jax.models.common import Buffer


class Margins(nnx.Module):
    """Per-channel constants a loss reads (OFD's margins, one array per segment pair), kept as a `Buffer` so that
    they travel with the student's statistics and checkpoints and receive no gradient."""

    def __init__(self, margins: Sequence[jax.Array]):
        self.sizes = tuple(int(m.shape[0]) for m in margins)
        self.flat = Buffer(jnp.concatenate([jnp.asarray(m, jnp.float32) for m in margins]))

    def values(self) -> list[jax.Array]:
        out, start = [], 0
        for size in self.sizes:
            out.append(self.flat[...][start : start + size])
            start += size
        return out


def _ofd(ctx: Context):
    """KD + `loss.ofd.weight` x sum_k 2^(k-n+1) x the partial L2 of the paired taps (`segments` are the
    pre-activation taps here: the method needs "preact")."""
    logits, segments = ctx.student()
    teacher_logits, teacher_segments = ctx.teacher()
    total, parts = ctx.base(logits, teacher_logits)
    mapped, n = ctx.mapped(segments), len(ctx.pairs)
    margins = ctx.module.projector.values()
    ofd = sum(
        2.0 ** (k - n + 1) * losses.ofd(m, teacher_segments[t], margins[k])
        for k, (m, (_, t)) in enumerate(zip(mapped, ctx.pairs, strict=True))
    )
    return total + ctx.loss.ofd.weight * ofd, {**parts, "ofd": ofd}, logits


def _margins(b: Build) -> dict:
    if not hasattr(b.teacher_model, "bn_before_relu"):
        raise ValueError(
            f"loss.name='ofd' needs the BN before each of the teacher's pre-activation taps; "
            f"{type(b.teacher_model).__name__} does not name them (bn_before_relu); the CIFAR ResNets do"
        )
    bns = b.teacher_model.bn_before_relu()
    return {"projector": Margins([losses.ofd_margin(bns[t].scale[...], bns[t].bias[...]) for _, t in b.pairs])}


OFD = Method(
    "ofd",
    "OFD (Heo et al. 2019): KD + partial L2 of pre-ReLU stages above the teacher's margins",
    family="zoo",
    objective=_ofd,
    knobs={"weight": 1e-3},  # on its per-example sums (mdistiller's CIFAR FEAT_WEIGHT)
    kinds={"weight": "weight"},
    tune="weight",
    grid=(1e-4, 1e-3),
    needs=frozenset({"teacher", "preact", "feature_maps"}),
    pairing="all",
    connectors=True,
    modules=_margins,
    zoo=True,
)
