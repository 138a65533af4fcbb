"""The logit methods: CE and PURF's teacher regulariser (objectives without a teacher), KD, DKD, MKD, PFKD, and
DIST, LS-KD and MLKD (KD-zoo methods that replace the KL)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from extkd_jax import losses
from extkd_jax.data.mixing import mixup
from extkd_jax.losses.zoo import MLKD_TEMPERATURES
from extkd_jax.methods.base import Build, Method
from extkd_jax.methods.context import Context, pooled
from extkd_jax.models.common import linear

TEACHER = frozenset({"teacher"})


def _ce(ctx: Context):
    logits, _ = ctx.student()
    ce = ctx.ce(logits)
    return ce, {"ce": ce}, logits


def _purf(ctx: Context):
    """PURF (Applied Soft Computing 2024), the simplest faithful reading: while training a teacher, penalise the
    relative change of every segment under Gaussian input noise of `sigma` pixels (`losses.smoothness`)."""
    k = ctx.loss.purf
    logits, segments = ctx.student()
    noisy = ctx.images + k.sigma * jax.random.normal(ctx.key, ctx.images.shape)
    _, noisy_segments = ctx.student(noisy)
    ce, smooth = ctx.ce(logits), losses.smoothness(segments, noisy_segments)
    return ce + k.weight * smooth, {"ce": ce, "smoothness": smooth}, logits


def _kd(ctx: Context):
    logits, _ = ctx.student()
    total, parts = ctx.base(logits, ctx.teacher()[0])
    return total, parts, logits


def _dkd(ctx: Context):
    """CE + min(1, epoch / warmup_epochs) x DKD(alpha, beta, T) (no plain KL)."""
    logits, _ = ctx.student()
    c, k = ctx.loss, ctx.loss.dkd
    decoupled = losses.dkd(logits, ctx.teacher()[0], ctx.labels, k.alpha, k.beta, c.temperature)
    ramp = jnp.minimum(1.0, ctx.epoch / k.warmup_epochs) if k.warmup_epochs > 0 else 1.0
    ce = ctx.ce(logits)
    return c.ce_weight * ce + ramp * decoupled, {"ce": ce, "dkd": decoupled}, logits


def _mkd(ctx: Context):
    """MKD (Algorithms 2022): the student sees ``lam x_i + (1 - lam) x_j`` (lam ~ Beta(mix_alpha, mix_alpha)); the
    teacher sees the clean images, and the KL is mixed at the loss level (`losses.mixture_kd`); CE with the mixed
    labels."""
    images, targets, lam, perm = mixup(jax.random.fold_in(ctx.key, 0), ctx.images, ctx.targets, ctx.loss.mkd.mix_alpha)
    logits, _ = ctx.student(images)
    teacher_logits = ctx.teacher()[0]
    ce = losses.cross_entropy(logits, targets, ctx.loss.label_smoothing)
    kd = losses.mixture_kd(logits, teacher_logits, teacher_logits[perm], lam, ctx.loss.temperature)
    return ctx.loss.ce_weight * ce + ctx.loss.kd_weight * kd, {"ce": ce, "kd": kd}, logits


def _pfkd(ctx: Context):
    """Penultimate-feature KD with teacher labels (Applied Sciences 2024), the simplest faithful reading: the CE
    target is the teacher's predicted class, not the data set's label; the penultimate features are matched as
    distributions at a feature temperature (`losses.feature_kl`) through a linear projector; plus the logit KL."""
    k = ctx.loss.pfkd
    logits, segments = ctx.student()
    teacher_logits, teacher_segments = ctx.teacher()
    ce = losses.cross_entropy(logits, jnp.argmax(teacher_logits, -1), ctx.loss.label_smoothing)
    kd = losses.kd_kl(logits, teacher_logits, ctx.loss.temperature)
    feature = losses.feature_kl(
        ctx.module.projector(pooled(segments[-1])), pooled(teacher_segments[-1]), k.feature_temperature
    )
    total = ctx.loss.ce_weight * ce + ctx.loss.kd_weight * kd + k.feature_weight * feature
    return total, {"ce": ce, "kd": kd, "feature": feature}, logits


def _pfkd_modules(b: Build) -> dict:
    return {"projector": linear(b.student_shapes[-1][-1], b.teacher_shapes[-1][-1], rngs=b.rngs, dtype=b.dtype)}


def _instead_of_kl(loss_fn):
    """CE + kd_weight x `loss_fn(ctx, logits, teacher_logits)` in place of the KL (DIST, LS-KD, MLKD)."""

    def objective(ctx: Context):
        c = ctx.loss
        logits, _ = ctx.student()
        teacher_logits, _ = ctx.teacher()
        ce = ctx.ce(logits)
        kd = loss_fn(ctx, logits, teacher_logits)
        return c.ce_weight * ce + c.kd_weight * kd, {"ce": ce, c.name: kd}, logits

    objective.__doc__ = loss_fn.__doc__
    return objective


def _dist(ctx: Context, logits, teacher_logits):
    """DIST: inter- (beta) and intra-class (gamma) Pearson relations at T."""
    k = ctx.loss.dist
    return losses.dist(logits, teacher_logits, k.beta, k.gamma, ctx.loss.temperature)


def _ls_kd(ctx: Context, logits, teacher_logits):
    """Logit-standardised KD: the KL between z-scored logits at T."""
    return losses.logit_standardized_kd(logits, teacher_logits, ctx.loss.temperature)


def _mlkd(ctx: Context, logits, teacher_logits):
    """Multi-level logit KD at T, 2, 3, 5, 6 (instance, class and batch level)."""
    temperatures = (ctx.loss.temperature, *MLKD_TEMPERATURES)
    return losses.mlkd(logits, teacher_logits, temperatures, batch_invariant=ctx.loss.mlkd.batch_invariant)


CE = Method("ce", "cross-entropy alone (a teacher, or a student trained from labels)", objective=_ce, role=False)
PURF = Method(
    "purf",
    "PURF's teacher objective (Applied Soft Computing 2024): CE + smoothness of the segments under input noise",
    objective=_purf,
    knobs={"weight": 0.1, "sigma": 8.0},  # smoothness under noise of this standard deviation, in pixels
    kinds={"weight": "weight", "sigma": "nonnegative"},
    needs=frozenset({"randomness"}),
    role=False,
)
KD = Method(
    "kd",
    "knowledge distillation (Hinton et al. 2015) on the transfer set",
    objective=_kd,
    tune="temperature",
    grid="temperature",
    needs=TEACHER,
)
DKD = Method(
    "dkd",
    "decoupled knowledge distillation (Zhao et al. 2022)",
    objective=_dkd,
    knobs={"alpha": 1.0, "beta": 8.0, "warmup_epochs": 0},
    kinds={"alpha": "weight", "beta": "weight", "warmup_epochs": "nonnegative"},
    tune="beta",
    grid=(2.0, 8.0),
    needs=TEACHER,
)
MKD = Method(
    "mkd",
    "MKD (Algorithms 2022): mixup inputs, KD mixed at the loss level",
    objective=_mkd,
    knobs={"mix_alpha": 1.0},  # Beta(a, a) of its mixup
    kinds={"mix_alpha": "positive"},
    tune="mix_alpha",
    grid=(0.2, 1.0),
    needs=frozenset({"teacher", "randomness", "own_mixing"}),
)
PFKD = Method(
    "pfkd",
    "penultimate-feature KD with teacher labels (Applied Sciences 2024)",
    objective=_pfkd,
    knobs={"feature_temperature": 4.0, "feature_weight": 1.0},
    kinds={"feature_temperature": "positive", "feature_weight": "weight"},
    tune="feature_temperature",
    grid=(2.0, 8.0),
    needs=TEACHER,
    modules=_pfkd_modules,
)
DIST = Method(
    "dist",
    "DIST (Huang et al. 2022): inter- and intra-class Pearson relations instead of KL",
    family="zoo",
    objective=_instead_of_kl(_dist),
    knobs={"beta": 1.0, "gamma": 1.0},  # inter-class and intra-class relation (in place of the KL, x kd_weight)
    kinds={"beta": "weight", "gamma": "weight"},
    tune="temperature",
    grid="temperature",
    needs=TEACHER,
    zoo=True,
)
LS_KD = Method(
    "ls_kd",
    "logit-standardised KD (Sun et al. 2024): KL between z-scored logits",
    family="zoo",
    objective=_instead_of_kl(_ls_kd),
    tune="temperature",
    grid="temperature",
    needs=TEACHER,
    zoo=True,
)
MLKD = Method(
    "mlkd",
    "multi-level logit KD (Jin et al. 2023): instance, class and batch relations at 5 temperatures",
    family="zoo",
    objective=_instead_of_kl(_mlkd),
    knobs={"batch_invariant": False},  # relation terms x C / N^2 (True) or the reference's 1/C, 1/N
    kinds={"batch_invariant": "flag"},
    tune="temperature",
    grid="temperature",
    needs=TEACHER,
    zoo=True,
)
