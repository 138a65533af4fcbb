"""MTKD-SSR (IJCV 2023): stage-wise channel and response KD with cross-stage review, and its stage heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from extkd_jax import losses
from extkd_jax.methods.base import Build, Method
from extkd_jax.methods.context import Context, pooled
from extkd_jax.models.common import linear


class Head(nnx.Module):
    """A classifier on a stage: global average pooling, then one linear layer (MTKD-SSR's stage heads)."""

    def __init__(self, features: int, classes: int, *, rngs: nnx.Rngs, dtype):
        self.linear = linear(features, classes, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear(x).astype(jnp.float32)


def _mtkd_ssr(ctx: Context):
    """MTKD-SSR (IJCV 2023), from its abstract: SCD = channel-wise KD of every stage through a connector (for an
    MLP's vector segments, the KL of the whole vector as a distribution); SRD =
    a head (average pool + linear) on each student stage taught by the teacher's final response; CRD = each head
    also taught by the next stage's head, the last by the final logits (stop-gradient on the teachers). Weights:
    `loss.mtkd_ssr.scd_weight`, `srd_weight`, `review_weight` (the cross-stage review, the paper's CRD)."""
    k = ctx.loss.mtkd_ssr
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
    total = total + k.scd_weight * scd + k.srd_weight * srd + k.review_weight * crd
    return total, {**parts, "scd": scd, "srd": srd, "crd": crd}, logits


def _heads(b: Build) -> dict:
    return {"heads": [Head(shape[-1], b.num_classes, rngs=b.rngs, dtype=b.dtype) for shape in b.student_shapes]}


MTKD_SSR = Method(
    "mtkd_ssr",
    "MTKD-SSR (IJCV 2023): stage-wise channel and response KD, cross-stage review",
    family="features",
    objective=_mtkd_ssr,
    knobs={"scd_weight": 1.0, "srd_weight": 1.0, "review_weight": 1.0},
    kinds={"scd_weight": "weight", "srd_weight": "weight", "review_weight": "weight"},
    tune="scd_weight",
    grid=(0.1, 1.0),
    needs=frozenset({"teacher"}),
    pairing="all",
    connectors=True,
    modules=_heads,
)
