"""Everything static a run compiles: the student (+ connectors), the frozen teacher and the step function."""

from __future__ import annotations

import dataclasses
from typing import Any

import optax

from extkd_jax.train.builders import DTYPES, build_student, segment_shapes
from extkd_jax.train.objectives import segment_pairs
from extkd_jax.train.optim import create_learning_rate_fn, create_optimizer
from extkd_jax.train.state import ModelParts, TrainState, init_train_state, split_model
from extkd_jax.train.steps import StepFn, TeacherProgram, make_step


@dataclasses.dataclass(frozen=True)
class Program:
    parts: ModelParts  # student + connectors
    teacher: TeacherProgram | None
    pairs: tuple[tuple[int, int], ...]
    tx: optax.GradientTransformation
    learning_rate_fn: optax.Schedule
    step_fn: StepFn
    compute_dtype: Any

    def init_state(self) -> TrainState:
        return init_train_state(self.parts, self.tx)

    @property
    def teacher_vars(self):
        return None if self.teacher is None else self.teacher.variables


def fold_teacher(teacher_parts: ModelParts) -> ModelParts:
    """The teacher with every conv -> BatchNorm pair folded into one conv (exact in inference mode)."""
    from extkd_jax.models import fold_batchnorm

    return split_model(fold_batchnorm(teacher_parts.merge()))


def build_program(
    config,
    num_classes: int,
    input_shape: tuple[int, ...],
    steps_per_epoch: int,
    teacher_parts: ModelParts | None = None,
) -> Program:
    """Builds the student for `config` (connectors sized from the teacher's segments) and its pure step.

    `input_shape` is one example's (H, W, C); `teacher_parts` is None for a run without a teacher.
    """
    compute_dtype = DTYPES[config.compute_dtype]
    batch_shape = (2,) + tuple(input_shape)
    teacher, pairs, teacher_shapes = None, (), []
    if teacher_parts is not None:
        teacher_shapes = segment_shapes(teacher_parts, batch_shape)
        if config.teacher.fold_batchnorm:
            teacher_parts = fold_teacher(teacher_parts)
        teacher = TeacherProgram(teacher_parts)
        plain = build_student(config, num_classes, batch_shape, (), [], compute_dtype)
        student_shapes = segment_shapes(split_model(plain), batch_shape, attr="student")
        pairs = segment_pairs(config.loss, len(student_shapes), len(teacher_shapes))
    student = build_student(config, num_classes, batch_shape, pairs, teacher_shapes, compute_dtype)
    parts = split_model(student)
    learning_rate_fn = create_learning_rate_fn(config.optim, steps_per_epoch, config.num_epochs)
    tx = create_optimizer(config.optim, learning_rate_fn)
    step_fn = make_step(
        parts,
        config.loss,
        tx,
        learning_rate_fn,
        steps_per_epoch,
        teacher,
        pairs,
        skip_nonfinite=config.on_nonfinite == "skip",
    )
    return Program(parts, teacher, pairs, tx, learning_rate_fn, step_fn, compute_dtype)
