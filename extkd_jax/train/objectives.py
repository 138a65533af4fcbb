"""The training objectives, by `loss.name`: each a function of a `Context` that runs the networks it needs on the
inputs it needs (clean, mixed, adversarial, sampled, rotated) and returns (total, unweighted parts).

| loss.name   | total (on top of ce_weight * CE and, where there is a teacher, kd_weight * T^2 KL)               |
|-------------|--------------------------------------------------------------------------------------------------|
| ce, purf    | CE; purf adds purf_weight * smoothness of the segments under input noise (a teacher's regulariser) |
| kd          | -                                                                                                |
| fitnet      | segment_weight * MSE(middle segment through a connector)                                         |
| extended_kd | segment_weight * sum_k MSE(segment k through its connector)                                      |
| at          | segment_weight * attention transfer(segments)                                                    |
| dkd         | CE + min(1, epoch / dkd_warmup_epochs) * DKD(alpha, beta, T) (no plain KL)                       |
| mkd         | student on a mixup of two images; CE and KL mixed at the loss level against the two sources      |
| mtkd_ssr    | segment_weight * channel KD per stage + stage heads taught by the teacher (SRD) and by the next    |
|             | stage (CRD)                                                                                      |
| amkd        | KL on boundary samples (a targeted attack on the teacher) + triplet_weight * triplet margin       |
| pfkd        | CE against the teacher's labels + feature_weight * feature-temperature KL of penultimate features  |
| mismatch    | sample_weight * confidence-weighted KL on images sampled near the data and pushed by the teacher   |
| ssd_kd      | relation_weight * RKD(penultimate) + ss_weight * (rotation prediction + KL on rotated images)     |
| pkt, rkd, cc| <name>_weight * the loss on the penultimate features (the zoo, RepDistiller's placement)          |
| sp          | sp_weight * similarity-preserving loss on the last segment                                       |
| nst         | nst_weight * sum over paired segments of neuron selectivity transfer                             |
| dist, ls_kd | CE + kd_weight * DIST (dist_beta, dist_gamma, T) or logit-standardised KD, instead of the KL     |
| mlkd        | CE + kd_weight * multi-level logit KD at T, 2, 3, 5, 6 (instance, class and batch level)          |
| vid         | vid_weight * sum over paired segments of VID's Gaussian NLL through learned regressors            |
| ab, fsp     | for the first init_epochs epochs only <name>_weight * activation-boundary / FSP loss of the paired  |
|             | segments (through connectors); then CE + KL alone (RepDistiller's init stage)                    |
| ft          | for the first init_epochs epochs the paraphraser learns to reconstruct the teacher's last segment;  |
|             | then ft_weight * factor transfer (translator's factor vs the frozen paraphraser's)               |
| reviewkd    | min(1, epoch / review_warmup_epochs) * review_weight * hierarchical context loss of the student's   |
|             | segments and pooled features, fused by attention (ABF), against the teacher's                    |
| ofd         | ofd_weight * sum_k 2^(k-n+1) * margin-ReLU partial L2 of the pre-activation taps (connectors)     |
| crd         | contrast_weight * NCE of the student's and the teacher's embedded penultimate features, each      |
|             | against the other network's momentum memory bank (positive: the example itself; negatives: other |
|             | classes)                                                                                         |
| kdsvd       | kdsvd_weight * RBF relations of the top singular vectors of consecutive paired segments          |

Each method's choices where its paper leaves them open are in its function's docstring and docs/methods.md. The
functions are in objectives_logits.py (logit and segment methods), objectives_samples.py (methods on inputs they
make) and objectives_zoo.py (the KD zoo); `Context` in objective_context.py.
"""

from __future__ import annotations

import jax
from flax import nnx

from extkd_jax.models import forward_with_segments
from extkd_jax.train import objectives_logits, objectives_samples, objectives_zoo
from extkd_jax.train.objective_context import Context, pooled  # noqa: F401 - the objectives' interface
from extkd_jax.train.objectives_samples import boundary_samples, sampled_images  # noqa: F401
from extkd_jax.train.objectives_zoo import INIT_STAGE_LOSSES, ZOO_LOSSES  # noqa: F401

TEACHER_LOSSES = (
    "kd",
    "fitnet",
    "extended_kd",
    "at",
    "dkd",
    "mkd",
    "mtkd_ssr",
    "amkd",
    "pfkd",
    "mismatch",
    "ssd_kd",
    *ZOO_LOSSES,
)
# losses that pair student and teacher segments
SEGMENT_LOSSES = (
    "fitnet",
    "extended_kd",
    "at",
    "mtkd_ssr",
    "nst",
    "vid",
    "ab",
    "fsp",
    "ft",
    "reviewkd",
    "ofd",
    "kdsvd",
)
CONNECTOR_LOSSES = ("fitnet", "extended_kd", "mtkd_ssr", "ab", "fsp", "ofd")  # ... through learned connectors
PREACT_LOSSES = ("ofd",)  # read the networks' pre-activation taps instead of their segments
LOSS_NAMES = ("ce", "purf", *TEACHER_LOSSES)


OBJECTIVES = {**objectives_logits.OBJECTIVES, **objectives_samples.OBJECTIVES, **objectives_zoo.OBJECTIVES}


def objective(ctx: Context) -> tuple[jax.Array, dict, jax.Array]:
    """(total, unweighted parts, the student's logits on the batch) of `ctx.loss.name`."""
    return OBJECTIVES[ctx.loss.name](ctx)


def run_student_fn(module, normalize, key, taps: str = "segments"):
    """pixel images -> (logits, segments or pre-activation taps) of the student model in train mode (dropout keys
    from `key`)."""
    calls = {"n": 0}

    def run(images):
        calls["n"] += 1  # each call its own dropout stream; the first one `key` itself
        rngs = nnx.Rngs(dropout=key if calls["n"] == 1 else jax.random.fold_in(key, calls["n"]))
        return forward_with_segments(module.model, normalize(images), train=True, rngs=rngs, taps=taps)

    return run
