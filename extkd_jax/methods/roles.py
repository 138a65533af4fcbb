"""The methods `extkd reproduce` compares (the loss each trains with, the knob tuned on validation, ...) and the
config of each role of an experiment: its teacher, or one student method.

The method layer (below configs/ and the engine): configs/base.py's `with_variant` turns an experiment preset into
one of its runs with `role_config`, and extkd_jax.experiment builds every run of `extkd reproduce` from these.
It imports nothing of the package. (The method registry of issue 23 is to replace this table.)
"""

from __future__ import annotations

import dataclasses

import ml_collections


@dataclasses.dataclass(frozen=True)
class Method:
    """A student training method: its loss, the knob tuned on validation, whether it sees the dropped classes,
    what it adds to the data augmentation, and which teacher it learns from."""

    loss: str
    description: str
    knob: str | None = None  # a `loss.*` key
    sees_dropped: bool = False
    augment: str = ""  # appended to data.augment, e.g. "+mixup"
    teacher: str = "teacher"  # the experiment's teacher run it distils from: "teacher" or "teacher_purf"

    @property
    def distils(self) -> bool:
        return self.loss != "ce"


METHODS: dict[str, Method] = {
    "scratch_full": Method(
        "ce", "trained from scratch with cross-entropy on the full training set (all classes)", sees_dropped=True
    ),
    "scratch_transfer": Method("ce", "trained from scratch with cross-entropy on the transfer set"),
    "kd": Method("kd", "knowledge distillation (Hinton et al. 2015) on the transfer set", "temperature"),
    "fitnet": Method(
        "fitnet", "FitNet (Romero et al. 2015): KD + MSE of the middle segment through a connector", "segment_weight"
    ),
    "at": Method("at", "attention transfer (Zagoruyko & Komodakis 2017) + KD", "segment_weight"),
    "extended_kd": Method(
        "extended_kd", "Extended-KD (Yuan & Pan 2019): KD + MSE of every segment through connectors", "segment_weight"
    ),
    "dkd": Method("dkd", "decoupled knowledge distillation (Zhao et al. 2022)", "dkd_beta"),
    "mkd": Method("mkd", "MKD (Algorithms 2022): mixup inputs, KD mixed at the loss level", "mix_alpha"),
    "mtkd_ssr": Method(
        "mtkd_ssr", "MTKD-SSR (IJCV 2023): stage-wise channel and response KD, cross-stage review", "segment_weight"
    ),
    "amkd": Method("amkd", "AMKD (2020): KD on boundary samples + triplet margin on embeddings", "triplet_weight"),
    "pfkd": Method("pfkd", "penultimate-feature KD with teacher labels (Applied Sciences 2024)", "feature_temperature"),
    "mismatch": Method(
        "mismatch",
        "KD under distribution mismatch (LNCS 2021): KD on images sampled near the data "
        "and classified well by the teacher",
        "sample_weight",
    ),
    "purf_kd": Method(
        "kd",
        "KD from a teacher trained with PURF's smoothness regulariser (Applied Soft Computing 2024)",
        "temperature",
        teacher="teacher_purf",
    ),
    "ssd_kd": Method(
        "ssd_kd", "SSD-KD (Medical Image Analysis 2023): KD + relational KD + a rotation task", "relation_weight"
    ),
    "kd_mixup": Method(
        "kd",
        "KD with mixup inputs, teacher and student on the same mix (Neurocomputing 2024)",
        "temperature",
        augment="+mixup",
    ),
    "kd_cutmix": Method("kd", "KD with CutMix inputs (Neurocomputing 2024)", "temperature", augment="+cutmix"),
    "kd_auto": Method(
        "kd", "KD with an AutoAugment-style policy (Neurocomputing 2024)", "temperature", augment="+auto"
    ),
    # the standard KD zoo (RepDistiller / mdistiller baselines), each added to KD unless it replaces the KL
    "pkt": Method(
        "pkt", "PKT (Passalis & Tefas 2018): KD + probabilistic transfer of feature similarities", "pkt_weight"
    ),
    "rkd": Method("rkd", "RKD (Park et al. 2019): KD + distances and angles between examples' features", "rkd_weight"),
    "sp": Method("sp", "similarity-preserving KD (Tung & Mori 2019): KD + batch similarity matrices", "sp_weight"),
    "cc": Method(
        "cc", "correlation congruence (Peng et al. 2019): KD + RBF correlations between examples", "cc_weight"
    ),
    "nst": Method("nst", "neuron selectivity transfer (Huang & Wang 2017): KD + MMD of channel maps", "nst_weight"),
    "dist": Method(
        "dist", "DIST (Huang et al. 2022): inter- and intra-class Pearson relations instead of KL", "temperature"
    ),
    "ls_kd": Method("ls_kd", "logit-standardised KD (Sun et al. 2024): KL between z-scored logits", "temperature"),
    "mlkd": Method(
        "mlkd",
        "multi-level logit KD (Jin et al. 2023): instance, class and batch relations at 5 temperatures",
        "temperature",
    ),
    "vid": Method(
        "vid",
        "VID (Ahn et al. 2019): KD + Gaussian likelihood of teacher segments under regressors",
        "vid_weight",
    ),
    "ab": Method("ab", "activation boundaries (Heo et al. 2019): a feature-only init stage, then KD", "init_epochs"),
    "fsp": Method(
        "fsp", "FSP (Yim et al. 2017): flow matrices between layers in an init stage, then KD", "init_epochs"
    ),
    "reviewkd": Method(
        "reviewkd",
        "ReviewKD (Chen et al. 2021): KD + attention-fused student stages vs the teacher's",
        "review_weight",
    ),
    "ofd": Method(
        "ofd", "OFD (Heo et al. 2019): KD + partial L2 of pre-ReLU stages above the teacher's margins", "ofd_weight"
    ),
    "ft": Method(
        "ft", "factor transfer (Kim et al. 2018): KD + factors of a translator against a paraphraser's", "ft_weight"
    ),
    "crd": Method(
        "crd",
        "CRD (Tian et al. 2020): KD + NCE of embeddings against the other network's memory bank",
        "contrast_weight",
    ),
    "kdsvd": Method(
        "kdsvd", "KDSVD (Lee et al. 2018): KD + RBF relations of singular vectors between stages", "kdsvd_weight"
    ),
}
TEACHER_RUNS = ("teacher", "teacher_purf")


def _copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(config.to_dict())


def teacher_config(config: ml_collections.ConfigDict, run: str = "teacher") -> ml_collections.ConfigDict:
    """A teacher: `teacher.name` trained alone on every class, with cross-entropy (`teacher`) or with PURF's
    regulariser (`teacher_purf`)."""
    if not config.teacher.name:
        raise ValueError("teacher.name is empty: `reproduce` needs the teacher architecture")
    c = _copy(config)
    c.kind = "run"
    c.model.name = config.teacher.name
    c.model.kwargs = ml_collections.ConfigDict(config.teacher.kwargs.to_dict())
    c.loss.name = "purf" if run == "teacher_purf" else "ce"
    c.data.drop_classes = ()
    c.data.keep_fraction = 0.0
    c.num_epochs = config.teacher.num_epochs or config.num_epochs
    c.optim.learning_rate = config.teacher.learning_rate or config.optim.learning_rate
    c.teacher.workdir = ""
    return c


def student_config(
    config: ml_collections.ConfigDict,
    method: str,
    seed: int,
    teacher_workdir: str,
    knob_value: float | None = None,
    keep_fraction: float | None = None,
) -> ml_collections.ConfigDict:
    """A student run of `method` with `seed`, its knob set to `knob_value` (None: as configured)."""
    spec = METHODS[method]
    c = _copy(config)
    c.kind = "run"
    c.seed = seed
    c.loss.name = spec.loss
    if spec.sees_dropped:
        c.data.drop_classes = ()
        c.data.keep_fraction = 0.0
    elif keep_fraction is not None:
        c.data.keep_fraction = float(keep_fraction)
    c.teacher.workdir = str(teacher_workdir) if spec.distils else ""
    c.data.augment = config.data.augment + spec.augment
    if knob_value is not None and spec.knob is not None:
        c.loss[spec.knob] = float(knob_value)
    return c


def role_config(config: ml_collections.ConfigDict, role: str) -> ml_collections.ConfigDict:
    """One run of an experiment config: `teacher`, or a student method (its teacher from `teacher.workdir`)."""
    if role == "teacher":
        return teacher_config(config)
    if role not in METHODS:
        raise ValueError(f"unknown role {role!r}; expected 'teacher' or one of {tuple(METHODS)}")
    return student_config(config, role, config.seed, config.teacher.workdir)
