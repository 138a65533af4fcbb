"""The configs of the runs `extkd reproduce` makes: one teacher, and one student per method and seed."""

from __future__ import annotations

import ml_collections

METHODS = ("scratch_full", "scratch_transfer", "kd", "fitnet", "extended_kd", "dkd")
METHOD_LOSS = {
    "scratch_full": "ce",
    "scratch_transfer": "ce",
    "kd": "kd",
    "fitnet": "fitnet",
    "extended_kd": "extended_kd",
    "dkd": "dkd",
}
GRID_METHODS = ("fitnet", "extended_kd")


def _copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(config.to_dict())


def methods_of(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    methods = tuple(config.reproduce.methods) + (("dkd",) if config.reproduce.dkd else ())
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"reproduce.methods holds {m!r}; expected names from {METHODS}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"reproduce.methods={methods} repeats a method")
    return methods


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The teacher: `teacher.name` trained alone with cross-entropy on every class."""
    if not config.teacher.name:
        raise ValueError("teacher.name is empty: `reproduce` needs the teacher architecture")
    c = _copy(config)
    c.model.name = config.teacher.name
    c.model.kwargs = ml_collections.ConfigDict(config.teacher.kwargs.to_dict())
    c.loss.name = "ce"
    c.data.drop_classes = ()
    c.data.keep_fraction = 0.0
    c.num_epochs = config.teacher.num_epochs or config.num_epochs
    c.optim.learning_rate = config.teacher.learning_rate or config.optim.learning_rate
    c.teacher.workdir = ""
    c.kind = "run"
    return c


def student_config(
    config: ml_collections.ConfigDict,
    method: str,
    seed: int,
    teacher_workdir: str,
    segment_weight: float | None = None,
) -> ml_collections.ConfigDict:
    """A student run of `method` (see METHOD_LOSS) with `seed`."""
    c = _copy(config)
    c.seed = seed
    c.loss.name = METHOD_LOSS[method]
    if method == "scratch_full":
        c.data.drop_classes = ()
        c.data.keep_fraction = 0.0
    if c.loss.name == "ce":
        c.teacher.workdir = ""
    else:
        c.teacher.workdir = str(teacher_workdir)
    if segment_weight is not None:
        c.loss.segment_weight = float(segment_weight)
    c.kind = "run"
    return c


def role_config(config: ml_collections.ConfigDict, role: str) -> ml_collections.ConfigDict:
    """One run of an experiment config: `teacher`, or a student method of METHODS (its teacher from
    `teacher.workdir`, set on the command line)."""
    if role == "teacher":
        return teacher_config(config)
    if role not in METHODS:
        raise ValueError(f"unknown role {role!r}; expected 'teacher' or one of {METHODS}")
    return student_config(config, role, config.seed, config.teacher.workdir)
