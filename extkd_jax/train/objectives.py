"""The training objective named by `config.loss.name`, composed from `extkd_jax.losses`.

| name        | total                                                                       |
|-------------|-----------------------------------------------------------------------------|
| ce          | ce                                                                          |
| kd          | ce_weight * ce + kd_weight * T^2 KL                                         |
| fitnet      | ce_weight * ce + kd_weight * T^2 KL + segment_weight * MSE(one middle segment) |
| extended_kd | ce_weight * ce + kd_weight * T^2 KL + segment_weight * sum_k MSE(segment k)  |
| at          | ce_weight * ce + kd_weight * T^2 KL + segment_weight * AT(segments)         |
| dkd         | ce_weight * ce + min(1, epoch / dkd_warmup_epochs) * DKD(alpha, beta, T)    |

Every part is returned unweighted, for the metrics log.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from extkd_jax import losses

LOSS_NAMES = ("ce", "kd", "fitnet", "extended_kd", "at", "dkd")
SEGMENT_LOSSES = ("fitnet", "extended_kd", "at")
TEACHER_LOSSES = ("kd", "fitnet", "extended_kd", "at", "dkd")


def segment_pairs(loss_config, num_student: int, num_teacher: int) -> tuple[tuple[int, int], ...]:
    """(student_index, teacher_index) pairs of the segments a loss distills; () for logit-only losses."""
    name = loss_config.name
    if name not in SEGMENT_LOSSES:
        return ()
    student_idx = tuple(loss_config.segments)
    teacher_idx = tuple(loss_config.teacher_segments)
    if not student_idx:
        if name == "fitnet":
            if num_student != num_teacher and not teacher_idx:
                raise ValueError(
                    f"loss.name='fitnet': the student has {num_student} segments and the teacher {num_teacher}; "
                    "set loss.segments and loss.teacher_segments to say which to match"
                )
            student_idx = (num_student // 2,)
        else:
            if num_student != num_teacher and not teacher_idx:
                raise ValueError(
                    f"loss.name={name!r}: the student has {num_student} segments and the teacher {num_teacher}, "
                    "and no mapping was given; set loss.segments and loss.teacher_segments (equal-length "
                    "index tuples)"
                )
            student_idx = tuple(range(num_student))
    teacher_idx = teacher_idx or student_idx
    if len(student_idx) != len(teacher_idx):
        raise ValueError(
            f"loss.segments={student_idx} and loss.teacher_segments={teacher_idx} differ in length"
        )
    for i in student_idx:
        if not -num_student <= i < num_student:
            raise ValueError(f"loss.segments holds {i}; the student has segments 0..{num_student - 1}")
    for i in teacher_idx:
        if not -num_teacher <= i < num_teacher:
            raise ValueError(
                f"loss.teacher_segments holds {i}; the teacher has segments 0..{num_teacher - 1}"
            )
    return tuple(zip(student_idx, teacher_idx))


def compute_objective(
    loss_config,
    student_logits: jax.Array,
    labels: jax.Array,
    teacher_logits: jax.Array | None = None,
    student_segments: Sequence[jax.Array] = (),
    teacher_segments: Sequence[jax.Array] = (),
    epoch: jax.Array | float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (total, parts). Segments are already paired (and passed through connectors)."""
    name = loss_config.name
    ce = losses.cross_entropy(student_logits, labels, label_smoothing=loss_config.label_smoothing)
    if name == "ce":
        return ce, {"ce": ce}
    temperature = loss_config.temperature
    if name in ("fitnet", "extended_kd"):
        return losses.extended_kd_loss(
            student_logits,
            teacher_logits,
            labels,
            list(student_segments),
            list(teacher_segments),
            temperature=temperature,
            ce_weight=loss_config.ce_weight,
            kd_weight=loss_config.kd_weight,
            segment_weight=loss_config.segment_weight,
            label_smoothing=loss_config.label_smoothing,
        )
    if name == "dkd":
        decoupled = losses.dkd(
            student_logits,
            teacher_logits,
            labels,
            alpha=loss_config.dkd_alpha,
            beta=loss_config.dkd_beta,
            temperature=temperature,
        )
        warmup = loss_config.dkd_warmup_epochs
        ramp = jnp.minimum(1.0, jnp.asarray(epoch, jnp.float32) / warmup) if warmup > 0 else 1.0
        total = loss_config.ce_weight * ce + ramp * decoupled
        return total, {"ce": ce, "dkd": decoupled}
    kd = losses.kd_kl(student_logits, teacher_logits, temperature=temperature)
    total = loss_config.ce_weight * ce + loss_config.kd_weight * kd
    parts = {"ce": ce, "kd": kd}
    if name == "at":
        at = losses.attention_transfer(list(student_segments), list(teacher_segments), p=loss_config.at_p)
        total = total + loss_config.segment_weight * at
        parts["at"] = at
    elif name != "kd":
        raise ValueError(f"loss.name={name!r}; expected one of {LOSS_NAMES}")
    return total, parts
