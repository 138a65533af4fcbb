"""Checks a config before anything runs: every bad value is named with what was expected."""

from __future__ import annotations

import math
import numbers

from extkd_jax.data.augment import parse_augment
from extkd_jax.methods import get_method, loss_names, method_names
from extkd_jax.methods.registry import did_you_mean, with_method_knobs

COMPUTE_DTYPES = ("float32", "bfloat16")
SCHEDULES = ("cosine", "step", "constant")
DATA_SOURCES = ("npz", "tfds", "sklearn")
# A loss weight above this cannot be meant: it scales the gradients past any useful step (the largest default is
# pkt's 3e4) and a loss of 1e26 times it overflows float32; weights above DIVERGENCE_HINT_WEIGHT are named when a
# loss turns non-finite.
MAX_LOSS_WEIGHT = 1e12
DIVERGENCE_HINT_WEIGHT = 1e6
# model / teacher kwargs that size a network: whole numbers >= 1 (nested in tuples for widths and VGG cfgs)
SIZE_KWARGS = ("hidden_sizes", "input_size", "in_channels", "widths", "depths", "depth", "widen_factor", "cfg")
RATE_KWARGS = ("dropout", "input_dropout")


class ConfigError(ValueError):
    """A config value is out of its allowed range."""


def _number(value, name: str, *, minimum=None, strict=False, maximum=None, integer=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name}={value!r}: expected a {'whole ' if integer else ''}number")
    if not math.isfinite(value):  # NaN passes every comparison (nan <= 0 is False)
        raise ConfigError(f"{name}={value!r}: expected a finite number")
    if integer and int(value) != value:
        raise ConfigError(f"{name}={value!r}: expected a whole number")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ConfigError(f"{name}={value!r}: expected a value {'>' if strict else '>='} {minimum}")
    if maximum is not None and value >= maximum:
        raise ConfigError(f"{name}={value!r}: expected a value < {maximum}")


def _loss_weight(value, name: str) -> None:
    _number(value, name, minimum=0)
    if value > MAX_LOSS_WEIGHT:
        raise ConfigError(
            f"{name}={value!r}: expected a loss weight <= {MAX_LOSS_WEIGHT:g}; a larger one scales the gradients "
            "past any useful step and overflows float32 (max 3.4e38) with the loss"
        )


def loss_weights(loss) -> dict[str, float]:
    """Every loss weight of a `loss` config block, by key: the shared ones and each method's knobs of kind
    "weight" (`loss.<method>.<knob>`; a tuple's entries indexed)."""
    out = {f"loss.{key}": loss[key] for key in ("ce_weight", "kd_weight") if key in loss}
    for name in method_names():
        for key, kind in get_method(name).kinds.items():
            if kind == "weight" and name in loss and key in loss[name]:
                value = loss[name][key]
                if isinstance(value, (tuple, list)):
                    out.update({f"loss.{name}.{key}[{i}]": v for i, v in enumerate(value)})
                else:
                    out[f"loss.{name}.{key}"] = value
    return out


def _knobs(loss) -> None:
    """Each registered method's knobs (`loss.<method>.<knob>`) by the kind its method declares; a plug-in's
    namespace, absent from the config, takes its method's defaults."""
    with_method_knobs(loss)
    for name in method_names():
        method = get_method(name)
        for key, kind in method.kinds.items():
            value, where = loss[name][key], f"loss.{name}.{key}"
            if kind == "weight":
                _loss_weight(value, where)
            elif kind == "flag":
                if not isinstance(value, bool):
                    raise ConfigError(f"{where}={value!r}: expected True or False")
            else:
                _number(value, where, **KIND_RANGES[kind])


KIND_RANGES = {
    "positive": {"minimum": 0, "strict": True},
    "nonnegative": {"minimum": 0},
    "count": {"minimum": 1, "integer": True},
    "steps": {"minimum": 0, "integer": True},
    "fraction": {"minimum": 0, "maximum": 1},
}


def divergence_hint(config) -> str:
    """The config's likely causes of a non-finite loss, for the message that stops the run."""
    big = [f"{k}={v:g}" for k, v in loss_weights(config.loss).items() if _real(v) and v > DIVERGENCE_HINT_WEIGHT]
    lowered = f"lower optim.learning_rate (now {config.optim.learning_rate:g})"
    if big:
        limit = f"{DIVERGENCE_HINT_WEIGHT:g}"
        return f"loss weights above {limit} are the likely cause ({', '.join(big)}): reduce them, or {lowered}"
    return lowered


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _model_kwargs(kwargs, name: str) -> None:
    """Size knobs of model.kwargs / teacher.kwargs (hidden sizes, widths, depths...): whole numbers >= 1; dropout
    rates in [0, 1). Checked here, before a zero width fails deep inside XLA."""
    for key in kwargs.keys() if kwargs is not None else ():
        value = kwargs[key]
        if key in SIZE_KWARGS and value is not None:
            leaves = list(_leaves(value))
            if not leaves:
                raise ConfigError(f"{name}.{key}={value!r}: expected at least one size")
            for leaf in leaves:
                if not _real(leaf) or not math.isfinite(leaf) or int(leaf) != leaf or leaf < 1:
                    raise ConfigError(f"{name}.{key}={value!r}: expected whole numbers >= 1, got {leaf!r}")
        elif key in RATE_KWARGS:
            _number(value, f"{name}.{key}", minimum=0, maximum=1)


def _leaves(value):
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def _choice(value, name: str, choices) -> None:
    if value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise ConfigError(f"{name}={value!r}{hint}: expected one of {tuple(choices)}")


def check_config(config, mode: str) -> None:
    """Raises ConfigError for the first bad value; `mode` is 'train', 'distill' or 'evaluate'."""
    from extkd_jax.models import model_names
    from extkd_jax.models.registry import import_modules

    _choice(mode, "mode", ("train", "distill", "evaluate"))
    data = config.data
    _choice(data.source, "data.source", DATA_SOURCES)
    try:
        _, _, mix = parse_augment(data.augment, data.name)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _choice(data.placement, "data.placement", ("auto", "replicated", "sharded"))
    _number(data.max_train_examples, "data.max_train_examples", minimum=0, integer=True)
    _choice(data.pipeline, "data.pipeline", ("auto", "device", "stream"))
    _number(data.device_budget_gb, "data.device_budget_gb", minimum=0, strict=True)
    _number(data.crop_size, "data.crop_size", minimum=0, integer=True)
    _number(data.stats_sample, "data.stats_sample", minimum=0, integer=True)
    _number(data.read_threads, "data.read_threads", minimum=1, integer=True)
    _number(data.val_size, "data.val_size", minimum=0, integer=True)
    _number(data.seed, "data.seed", minimum=0, integer=True)
    _number(config.seed, "seed", minimum=0, integer=True)
    _number(data.keep_fraction, "data.keep_fraction", minimum=0, maximum=1)
    for c in data.drop_classes:
        _number(c, "data.drop_classes entry", minimum=0, integer=True)
    repeated = sorted({c for c in data.drop_classes if tuple(data.drop_classes).count(c) > 1})
    if repeated:
        raise ConfigError(
            f"data.drop_classes={tuple(data.drop_classes)!r}: expected distinct classes, {repeated} repeated"
        )

    try:  # plug-ins first: they register the models the config names
        import_modules(config.get("imports", ()), "imports")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _choice(config.model.name, "model.name", model_names())
    _model_kwargs(config.model.get("kwargs"), "model.kwargs")
    _model_kwargs(config.teacher.get("kwargs"), "teacher.kwargs")
    loss = config.loss
    _choice(loss.name, "loss.name", loss_names())
    _number(loss.temperature, "loss.temperature", minimum=0, strict=True)
    for key, value in loss_weights(loss).items():
        _loss_weight(value, key)
    _number(loss.label_smoothing, "loss.label_smoothing", minimum=0, maximum=1)
    _number(loss.mix_alpha, "loss.mix_alpha", minimum=0, strict=True)
    _knobs(loss)
    for key in ("segments", "teacher_segments"):
        for i in loss[key]:
            _number(i, f"loss.{key} entry", integer=True)

    optim = config.optim
    _number(optim.learning_rate, "optim.learning_rate", minimum=0, strict=True)
    _number(optim.momentum, "optim.momentum", minimum=0, maximum=1)
    _number(optim.weight_decay, "optim.weight_decay", minimum=0)
    _number(optim.warmup_epochs, "optim.warmup_epochs", minimum=0)
    _number(optim.decay_factor, "optim.decay_factor", minimum=0, strict=True)
    _choice(optim.schedule, "optim.schedule", SCHEDULES)
    for e in optim.decay_epochs:
        _number(e, "optim.decay_epochs entry", minimum=0, strict=True)

    _number(config.batch_size, "batch_size", minimum=0, strict=True, integer=True)
    _number(config.eval_batch_size, "eval_batch_size", minimum=0, strict=True, integer=True)
    _number(config.num_epochs, "num_epochs", minimum=0, strict=True, integer=True)
    _number(config.steps_per_dispatch, "steps_per_dispatch", minimum=0, integer=True)
    _number(config.checkpoint_every_epochs, "checkpoint_every_epochs", minimum=1, integer=True)
    _number(config.keep_checkpoints, "keep_checkpoints", minimum=1, integer=True)
    _choice(config.compute_dtype, "compute_dtype", COMPUTE_DTYPES)
    _choice(config.on_nonfinite, "on_nonfinite", ("stop", "skip"))

    method = get_method(loss.name)
    if mode == "distill":
        if "teacher" not in method.needs:
            teacher_losses = tuple(n for n in loss_names() if "teacher" in get_method(n).needs)
            raise ConfigError(
                f"loss.name={loss.name!r} uses no teacher; `distill` expects one of {teacher_losses} "
                "(use `extkd train` for a student trained alone)"
            )
        if not config.teacher.workdir:
            raise ConfigError("teacher.workdir is empty: `distill` needs the workdir of a trained teacher")
        if config.teacher.name:
            _choice(config.teacher.name, "teacher.name", model_names())
    elif mode == "train" and "teacher" in method.needs:
        alone = tuple(n for n in loss_names() if "teacher" not in get_method(n).needs)
        raise ConfigError(
            f"loss.name={loss.name!r} needs a teacher: use `extkd distill`, or one of {alone} for `extkd train`"
        )
    if "positions" in method.needs and (data.pipeline == "stream" or data.placement == "sharded"):
        raise ConfigError(
            f"loss.name={loss.name!r} keeps a memory row per transfer example and needs each batch's positions in "
            "the set: "
            f"data.pipeline={data.pipeline!r} / data.placement={data.placement!r} do not provide them; use "
            "data.pipeline='device' with data.placement='replicated' (or 'auto' on one host)"
        )
    if "own_mixing" in method.needs and mix != "none":
        raise ConfigError(
            f"loss.name={loss.name!r} mixes its own inputs; data.augment={data.augment!r} mixes them again"
        )
