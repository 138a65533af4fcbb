"""The methods `extkd reproduce` compares (the loss each trains with, the knob tuned on validation, ...) and the
config of each role of an experiment: its teacher, or one student method.

The method layer (below configs/ and the engine): configs/base.py's `with_variant` turns an experiment preset into
one of its runs with `role_config`, and extkd_jax.experiment builds every run of `extkd reproduce` from these.
The table is the registry's (extkd_jax.methods.registry): every registered method with `role=True`; the role-only
methods (a scratch student, KD from another teacher or on other inputs) are defined here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import ml_collections

from extkd_jax.methods.base import Method
from extkd_jax.methods.registry import get_method, role_names


class _Roles(Mapping):
    """The methods of `extkd reproduce` by name (the registry's `role_names`, plug-ins included), read on use."""

    def __getitem__(self, name: str) -> Method:
        if name not in role_names():
            raise KeyError(name)
        return get_method(name)

    def __iter__(self) -> Iterator[str]:
        return iter(role_names())

    def __len__(self) -> int:
        return len(role_names())


METHODS: Mapping[str, Method] = _Roles()
SCRATCH_FULL = Method(
    "scratch_full",
    "trained from scratch with cross-entropy on the full training set (all classes)",
    family="roles",
    loss="ce",
    sees_dropped=True,
)
SCRATCH_TRANSFER = Method(
    "scratch_transfer", "trained from scratch with cross-entropy on the transfer set", family="roles", loss="ce"
)
PURF_KD = Method(
    "purf_kd",
    "KD from a teacher trained with PURF's smoothness regulariser (Applied Soft Computing 2024)",
    family="roles",
    loss="kd",
    tune="temperature",
    grid="temperature",
    teacher="teacher_purf",
)
KD_MIXUP = Method(
    "kd_mixup",
    "KD with mixup inputs, teacher and student on the same mix (Neurocomputing 2024)",
    family="roles",
    loss="kd",
    tune="temperature",
    grid="temperature",
    augment="+mixup",
)
KD_CUTMIX = Method(
    "kd_cutmix",
    "KD with CutMix inputs (Neurocomputing 2024)",
    family="roles",
    loss="kd",
    tune="temperature",
    grid="temperature",
    augment="+cutmix",
)
KD_AUTO = Method(
    "kd_auto",
    "KD with an AutoAugment-style policy (Neurocomputing 2024)",
    family="roles",
    loss="kd",
    tune="temperature",
    grid="temperature",
    augment="+auto",
)
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
    c.loss.name = spec.loss_name
    if spec.sees_dropped:
        c.data.drop_classes = ()
        c.data.keep_fraction = 0.0
    elif keep_fraction is not None:
        c.data.keep_fraction = float(keep_fraction)
    c.teacher.workdir = str(teacher_workdir) if spec.distils else ""
    c.data.augment = config.data.augment + spec.augment
    if knob_value is not None:
        spec.set_knob(c.loss, knob_value)
    return c


def role_config(config: ml_collections.ConfigDict, role: str) -> ml_collections.ConfigDict:
    """One run of an experiment config: `teacher`, or a student method (its teacher from `teacher.workdir`)."""
    if role == "teacher":
        return teacher_config(config)
    if role not in METHODS:
        raise ValueError(f"unknown role {role!r}; expected 'teacher' or one of {tuple(METHODS)}")
    return student_config(config, role, config.seed, config.teacher.workdir)
