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
    """`loss.dkd.ce_weight` x CE + (a warm-up over `loss.dkd.warmup_fraction` of the run) x DKD(alpha, beta, T),
    no plain KL: mdistiller's DKD, whose CE weight is its own (1.0), not KD's."""
    logits, _ = ctx.student()
    k = ctx.loss.dkd
    decoupled = losses.dkd(logits, ctx.teacher()[0], ctx.labels, k.alpha, k.beta, ctx.loss.temperature)
    ce = ctx.ce(logits)
    return k.ce_weight * ce + ctx.warmup(k.warmup_fraction) * decoupled, {"ce": ce, "dkd": decoupled}, logits


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
    """CE + kd_weight x `loss_fn(ctx, logits, teacher_logits)` in place of the KL (DIST, LS-KD, MLKD); a method
    with its own `ce_weight` / `kd_weight` knobs (its reference recipe's) uses them instead of KD's."""

    def objective(ctx: Context):
        c = ctx.loss
        own = c.get(c.name) or {}
        ce_weight = own.get("ce_weight", c.ce_weight)
        kd_weight = own.get("kd_weight", c.kd_weight)
        logits, _ = ctx.student()
        teacher_logits, _ = ctx.teacher()
        ce = ctx.ce(logits)
        kd = loss_fn(ctx, logits, teacher_logits)
        return ce_weight * ce + kd_weight * kd, {"ce": ce, c.name: kd}, logits

    objective.__doc__ = loss_fn.__doc__
    return objective


def _dist(ctx: Context, logits, teacher_logits):
    """DIST: inter- (beta) and intra-class (gamma) Pearson relations at T."""
    k = ctx.loss.dist
    return losses.dist(logits, teacher_logits, k.beta, k.gamma, ctx.loss.temperature)


def _ls_kd(ctx: Context, logits, teacher_logits):
    """Logit-standardised KD: the KL between z-scored logits at its own `base_temperature` (z-scored logits have
    unit spread, so KD's temperatures for raw logits do not carry over)."""
    return losses.logit_standardized_kd(logits, teacher_logits, ctx.loss.ls_kd.base_temperature)


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
    # mdistiller's CFG.DKD (engine/cfg.py 163-167): CE 1.0, alpha 1, beta 8, warm-up 20 of 240 epochs
    knobs={"alpha": 1.0, "beta": 8.0, "ce_weight": 1.0, "warmup_fraction": 20 / 240},
    kinds={"alpha": "weight", "beta": "weight", "ce_weight": "weight", "warmup_fraction": "fraction"},
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
    # inter-class (beta) and intra-class (gamma) relations in place of the KL; DIST's CIFAR recipe
    # (configs/strategies/distill/dist_cifar.yaml): CE x 1 (ori_loss_weight), DIST x 2 (kd_loss_weight)
    knobs={"beta": 1.0, "gamma": 1.0, "ce_weight": 1.0, "kd_weight": 2.0},
    kinds={"beta": "weight", "gamma": "weight", "ce_weight": "weight", "kd_weight": "weight"},
    # its own temperatures, not KD's grid: the reference's tau 1 (`dist`, ImageNet) and 4 (`dist_t4`, CIFAR),
    # lib/models/losses/kd_loss.py 29-33. T^2 x a Pearson term, whose gradient does not shrink with T as the KL's
    # does, is T^2 times steeper at KD's MNIST temperatures (10, 20): every such student collapsed to one class
    tune="temperature",
    grid=(1.0, 4.0),
    needs=TEACHER,
    zoo=True,
)
LS_KD = Method(
    "ls_kd",
    "logit-standardised KD (Sun et al. 2024): KL between z-scored logits",
    family="zoo",
    objective=_instead_of_kl(_ls_kd),
    # the reference's `--kd-weight 9` and `--base-temp 2` (3 for some pairs), CE 0.1 (mdistiller's KD config)
    knobs={"ce_weight": 0.1, "kd_weight": 9.0, "base_temperature": 2.0},
    kinds={"ce_weight": "weight", "kd_weight": "weight", "base_temperature": "positive"},
    tune="base_temperature",
    grid=(2.0, 3.0),
    reads_temperature=False,
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
