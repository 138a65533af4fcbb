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

from extkd_jax import losses
from extkd_jax.data.augment import parse_augment
from extkd_jax.models import (
    Connector,
    ContrastMemory,
    Margins,
    VidRegressor,
    create_model,
    ensure_model,
    fold_batchnorm,
    forward_with_segments,
)
from extkd_jax.models.common import linear
from extkd_jax.models.factor_transfer import Paraphraser, Translator
from extkd_jax.models.review import ReviewFusion
from extkd_jax.train.objectives import CONNECTOR_LOSSES, PREACT_LOSSES, SEGMENT_LOSSES
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
    """(student_index, teacher_index) pairs a loss distils; () for logit-only losses."""
    name = loss_config.name
    if name not in SEGMENT_LOSSES:
        return ()
    student_idx, teacher_idx = tuple(loss_config.segments), tuple(loss_config.teacher_segments)
    if not student_idx:
        if num_student != num_teacher and not teacher_idx and name != "ft":
            raise ValueError(
                f"loss.name={name!r}: the student has {num_student} segments and the teacher {num_teacher}, and "
                "no mapping was given; set loss.segments and loss.teacher_segments (equal-length index tuples)"
            )
        if name == "ft":  # the last segments (RepDistiller's feat[-2]: the last stage, before pooling)
            student_idx, teacher_idx = (-1,), teacher_idx or (-1,)
        else:
            student_idx = (num_student // 2,) if name == "fitnet" else tuple(range(num_student))  # at, mtkd_ssr: all
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
    pairs, extras = (), {}
    teacher_network, teacher_variables = teacher if teacher is not None else (None, None)
    if teacher is not None:
        taps = "preact" if config.loss.name in PREACT_LOSSES else "segments"
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
    elif config.loss.name == "ssd_kd":
        raise ValueError("loss.name='ssd_kd' needs a teacher")
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


class Head(nnx.Module):
    """A classifier on a stage: global average pooling, then one linear layer (MTKD-SSR's stage heads)."""

    def __init__(self, features: int, classes: int, *, rngs: nnx.Rngs, dtype):
        self.linear = linear(features, classes, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear(x).astype(jnp.float32)


def student_extras(
    config, num_classes: int, student_shapes, teacher_shapes, pairs, dtype, teacher_model=None, train_labels=None
) -> dict:
    """The trainable modules a loss adds to the student (`Student`'s connectors, heads, projector), initialised
    from a stream of their own so that adding them never changes the student's initial weights."""
    rngs = nnx.Rngs(params=config.seed + CONNECTOR_SEED_OFFSET)
    name, out = config.loss.name, {}
    if name in CONNECTOR_LOSSES:
        out["connectors"] = [
            Connector(student_shapes[s][1:], teacher_shapes[t][1:], rngs=rngs, dtype=dtype) for s, t in pairs
        ]
    student_dim, teacher_dim = student_shapes[-1][-1], teacher_shapes[-1][-1]  # penultimate features: channels
    if name == "mtkd_ssr":
        out["heads"] = [Head(shape[-1], num_classes, rngs=rngs, dtype=dtype) for shape in student_shapes]
    elif name == "amkd":
        out["projector"] = linear(student_dim, config.loss.embedding_size, rngs=rngs, dtype=dtype)
    elif name == "pfkd":
        out["projector"] = linear(student_dim, teacher_dim, rngs=rngs, dtype=dtype)
    elif name == "ssd_kd":
        out["projector"] = linear(student_dim, 4, rngs=rngs, dtype=dtype)  # the rotation head: 4 quarter turns
    elif name == "ft":
        ((s, t),) = pairs
        if len(student_shapes[s]) != 4 or len(teacher_shapes[t]) != 4:
            raise ValueError("loss.name='ft' needs feature maps (H, W, C): a segment of student or teacher is a vector")
        rate = config.loss.ft_rate
        out["connectors"] = [Translator(student_shapes[s][-1], teacher_shapes[t][-1], rate, rngs=rngs, dtype=dtype)]
        out["projector"] = Paraphraser(teacher_shapes[t][-1], rate, rngs=rngs, dtype=dtype)
    elif name == "ofd":
        if not hasattr(teacher_model, "bn_before_relu"):
            raise ValueError(
                f"loss.name='ofd' needs the BN before each of the teacher's pre-activation taps; "
                f"{type(teacher_model).__name__} does not name them (bn_before_relu); the CIFAR ResNets do"
            )
        bns = teacher_model.bn_before_relu()
        out["projector"] = Margins([losses.ofd_margin(bns[t].scale[...], bns[t].bias[...]) for _, t in pairs])
    elif name == "reviewkd":
        if any(len(student_shapes[s]) != 4 or len(teacher_shapes[t]) != 4 for s, t in pairs):
            raise ValueError("loss.name='reviewkd' needs feature maps (H, W, C): a paired segment is a vector")
        student_channels = [student_shapes[s][-1] for s, _ in pairs] + [student_dim]
        teacher_channels = [teacher_shapes[t][-1] for _, t in pairs] + [teacher_dim]
        out["projector"] = ReviewFusion(student_channels, teacher_channels, rngs=rngs, dtype=dtype)
    elif name == "crd":
        if train_labels is None:
            raise ValueError(
                "loss.name='crd' needs the transfer set's labels (one memory row per example): only the device "
                "pipeline (data.pipeline='device') provides them"
            )
        c = config.loss
        out["projector"] = ContrastMemory(
            student_dim, teacher_dim, train_labels, c.contrast_dim, rngs=rngs, dtype=dtype
        )
    elif name == "vid":
        init = losses.vid_log_scale(config.loss.vid_init_variance)
        out["connectors"] = [
            VidRegressor(
                student_shapes[s][-1],
                teacher_shapes[t][-1],
                spatial=len(student_shapes[s]) == 4 and len(teacher_shapes[t]) == 4,
                init_log_scale=init,
                rngs=rngs,
                dtype=dtype,
            )
            for s, t in pairs
        ]
    return out


def fold_network(network: Network, variables: dict) -> tuple[Network, dict]:
    """The network with every conv -> BatchNorm pair folded into one conv (exact in inference mode)."""
    graph, folded = split(fold_batchnorm(network.graph.merge(variables)))
    return dataclasses.replace(network, graph=graph), folded
