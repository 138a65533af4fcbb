"""Builds what a run compiles from its config: the student (+ the modules its loss adds), the frozen teacher, the
optimizer and the step."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from extkd_jax.data.augment import parse_augment
from extkd_jax.methods import Build, get_method
from extkd_jax.models import Connector, create_model, ensure_model, fold_batchnorm, forward_with_segments
from extkd_jax.train.step import Network, Student, TrainState, make_train_step, split

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Connectors are initialised from their own stream, so adding one never changes the student's initial weights.
CONNECTOR_SEED_OFFSET = 7


def build_model(name: str, kwargs, num_classes: int, seed: int, dtype, imports: Sequence[str] = ()) -> nnx.Module:
    """`create_model` with parameters from `seed` and dropout from `seed + 1` (two independent streams); `imports`:
    the modules that register `name` when it is not built in (a card's `model.imports`), imported if it is unknown."""
    ensure_model(name, imports)
    return create_model(name, num_classes, rngs=nnx.Rngs(params=seed, dropout=seed + 1), dtype=dtype, **dict(kwargs))


def segment_shapes(model: nnx.Module, input_shape: tuple[int, ...], taps: str = "segments") -> list[tuple[int, ...]]:
    """Shapes (batch axis included) of a model's segments (or pre-activation taps), computed abstractly."""
    graph, variables = split(model)

    def segments(variables, x):
        return forward_with_segments(graph.merge(variables), x, train=False, taps=taps)[1]

    out = jax.eval_shape(segments, variables, jax.ShapeDtypeStruct(input_shape, jnp.float32))
    return [tuple(s.shape) for s in out]


def segment_pairs(loss_config, num_student: int, num_teacher: int) -> tuple[tuple[int, int], ...]:
    """(student_index, teacher_index) pairs a loss distils, by its method's pairing; () for logit-only losses."""
    name, pairing = loss_config.name, get_method(loss_config.name).pairing
    if pairing == "none":
        return ()
    student_idx, teacher_idx = tuple(loss_config.segments), tuple(loss_config.teacher_segments)
    if not student_idx:
        if num_student != num_teacher and not teacher_idx and pairing != "last":
            raise ValueError(
                f"loss.name={name!r}: the student has {num_student} segments and the teacher {num_teacher}, and "
                "no mapping was given; set loss.segments and loss.teacher_segments (equal-length index tuples)"
            )
        if pairing == "last":  # the last segments (RepDistiller's feat[-2]: the last stage, before pooling)
            student_idx, teacher_idx = (-1,), teacher_idx or (-1,)
        else:
            student_idx = (num_student // 2,) if pairing == "middle" else tuple(range(num_student))
    teacher_idx = teacher_idx or student_idx
    if len(student_idx) != len(teacher_idx):
        raise ValueError(f"loss.segments={student_idx} and loss.teacher_segments={teacher_idx} differ in length")
    for idx, count, key, who in (
        (student_idx, num_student, "segments", "student"),
        (teacher_idx, num_teacher, "teacher_segments", "teacher"),
    ):
        for i in idx:
            if not -count <= i < count:
                raise ValueError(f"loss.{key} holds {i}; the {who} has segments 0..{count - 1}")
    return tuple(zip(student_idx, teacher_idx, strict=True))


def create_learning_rate_fn(optim_config, steps_per_epoch: int, num_epochs: int) -> optax.Schedule:
    """Per-step learning rate: linear warm-up, then cosine, step or constant."""
    base = float(optim_config.learning_rate)
    warmup_steps = int(round(optim_config.warmup_epochs * steps_per_epoch))
    total_steps = max(1, num_epochs * steps_per_epoch)
    if optim_config.schedule == "cosine":
        main = optax.cosine_decay_schedule(base, decay_steps=max(1, total_steps - warmup_steps))
    elif optim_config.schedule == "step":
        boundaries = {
            int(e * steps_per_epoch) - warmup_steps: optim_config.decay_factor for e in optim_config.decay_epochs
        }
        main = optax.piecewise_constant_schedule(base, boundaries)
    else:  # constant (config_checks allows nothing else)
        main = optax.constant_schedule(base)
    if warmup_steps == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, base, warmup_steps), main], [warmup_steps])


def create_optimizer(optim_config, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum and coupled L2 weight decay, as in the PyTorch recipes."""
    return optax.chain(
        optax.add_decayed_weights(float(optim_config.weight_decay)),
        optax.sgd(
            learning_rate_fn, momentum=float(optim_config.momentum) or None, nesterov=bool(optim_config.nesterov)
        ),
    )


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """Everything static a run compiles, and the initial values of what it trains."""

    student: Network  # the Student wrapper (model + the loss's modules): what the step trains
    model: Network  # the student model alone: what evaluation and checkpoints' "model" item use
    variables: dict  # initial {"params", "batch_stats"} of the Student wrapper
    teacher: Network | None
    teacher_variables: dict | None
    pairs: tuple[tuple[int, int], ...]
    tx: optax.GradientTransformation
    learning_rate_fn: optax.Schedule
    step_fn: Any

    def init_state(self) -> TrainState:
        params = self.variables["params"]
        return TrainState(jnp.zeros((), jnp.int32), params, self.variables["batch_stats"], self.tx.init(params))


def model_variables(variables: dict) -> dict:
    """The student model's own variables out of the Student wrapper's."""
    return {"params": variables["params"]["model"], "batch_stats": variables["batch_stats"].get("model", {})}


def build(
    config,
    num_classes: int,
    input_shape: tuple[int, ...],
    steps_per_epoch: int,
    mean: np.ndarray,
    std: np.ndarray,
    teacher: tuple[Network, dict] | None = None,
    train_labels: np.ndarray | None = None,
) -> TrainSetup:
    """The student of `config` (connectors sized from the teacher's segments), the optimizer and the pure step.

    `input_shape` is one example's (H, W, C); `mean`, `std` the student's input normalisation; `teacher` is
    None (a run without a teacher) or (Network, variables) of the trained teacher; `train_labels` the transfer
    set's labels in the order the device pipeline indexes them (crd's memory banks; None elsewhere).
    """
    dtype = DTYPES[config.compute_dtype]
    batch_shape = (2, *input_shape)
    model = build_model(config.model.name, config.model.kwargs, num_classes, config.seed, dtype)
    pairs, extras, method = (), {}, get_method(config.loss.name)
    teacher_network, teacher_variables = teacher if teacher is not None else (None, None)
    if teacher is not None:
        taps = "preact" if "preact" in method.needs else "segments"
        teacher_model = teacher_network.graph.merge(teacher_variables)
        teacher_shapes = segment_shapes(teacher_model, batch_shape, taps)
        student_shapes = segment_shapes(model, batch_shape, taps)
        pairs = segment_pairs(config.loss, len(student_shapes), len(teacher_shapes))
        extras = student_extras(
            config, num_classes, student_shapes, teacher_shapes, pairs, dtype, teacher_model, train_labels
        )
        if config.teacher.fold_batchnorm:
            teacher_network, teacher_variables = fold_network(teacher_network, teacher_variables)
        teacher_network = dataclasses.replace(teacher_network, taps=taps)
    elif method.modules is not None and "teacher" in method.needs:  # its modules are sized from the teacher's
        raise ValueError(f"loss.name={config.loss.name!r} needs a teacher")
    model_graph, _ = split(model)
    graph, variables = split(Student(model, **extras))
    student = Network(graph, mean, std, dtype)
    learning_rate_fn = create_learning_rate_fn(config.optim, steps_per_epoch, config.num_epochs)
    tx = create_optimizer(config.optim, learning_rate_fn)
    _, _, mix = parse_augment(config.data.augment, config.data.name)
    step_fn = make_train_step(
        student,
        config.loss,
        tx,
        learning_rate_fn,
        steps_per_epoch,
        teacher_network,
        pairs,
        skip_nonfinite=config.on_nonfinite == "skip",
        mix=mix,
        num_classes=num_classes,
        num_epochs=float(config.num_epochs),
    )
    return TrainSetup(
        student,
        Network(model_graph, mean, std, dtype),
        variables,
        teacher_network,
        teacher_variables,
        pairs,
        tx,
        learning_rate_fn,
        step_fn,
    )


def student_extras(
    config, num_classes: int, student_shapes, teacher_shapes, pairs, dtype, teacher_model=None, train_labels=None
) -> dict:
    """The trainable modules a method adds to the student (`Student`'s connectors, heads, projector): learned
    connectors of its paired segments where it has them, then its own (`Method.modules`), initialised from a stream
    of their own so that adding them never changes the student's initial weights."""
    rngs = nnx.Rngs(params=config.seed + CONNECTOR_SEED_OFFSET)
    method, out = get_method(config.loss.name), {}
    if method.connectors:
        out["connectors"] = [
            Connector(student_shapes[s][1:], teacher_shapes[t][1:], rngs=rngs, dtype=dtype) for s, t in pairs
        ]
    if method.modules is not None:
        build = Build(
            config, num_classes, student_shapes, teacher_shapes, pairs, dtype, rngs, teacher_model, train_labels
        )
        out.update(method.modules(build))
    return out


def fold_network(network: Network, variables: dict) -> tuple[Network, dict]:
    """The network with every conv -> BatchNorm pair folded into one conv (exact in inference mode)."""
    graph, folded = split(fold_batchnorm(network.graph.merge(variables)))
    return dataclasses.replace(network, graph=graph), folded
