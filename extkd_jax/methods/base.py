"""`Method`: everything the engine and `extkd reproduce` know about one distillation method, in one object.

A method owns its knobs under its own config namespace, `loss.<name>.<knob>` (the shared KD terms stay shared:
`loss.temperature`, `loss.ce_weight`, `loss.kd_weight`, `loss.label_smoothing`, `loss.segments`,
`loss.teacher_segments`), the knob tuned on validation and the two-value grid of the `:all` / `:zoo` comparisons,
what it needs from the engine, how it pairs segments, the modules it adds to the student and its objective.
The step, the set-up, the config checks and `reproduce` read these fields and name no method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

# what a method may need from the engine
NEEDS = (
    "teacher",  # a trained teacher (distill); without it the method trains alone (`extkd train`)
    "feature_maps",  # (H, W, C) segments: left out for MLP students
    "preact",  # the networks' pre-activation taps instead of their segments
    "positions",  # each batch's positions in the transfer set (device pipeline), and the set's labels at set-up
    "randomness",  # its own share of the step's key (sampling, attacks, rotations)
    "own_mixing",  # it mixes its own inputs: data.augment must not mix them again
    "sampling",  # it samples with the step's whole key (CRD's negatives): dropout gets a key of its own
)
PAIRINGS = ("none", "all", "middle", "last")
# knob kinds, checked by train/config_checks.py: weight (>= 0, bounded), positive (> 0), nonnegative (>= 0),
# count (a whole number >= 1), steps (a whole number >= 0), fraction (0 <= x < 1), flag (a bool)
KINDS = ("weight", "positive", "nonnegative", "count", "steps", "fraction", "flag")


@dataclasses.dataclass(frozen=True)
class Build:
    """What a method's `modules` builder sees at set-up: the config, the networks' segment shapes (batch axis first),
    the segment pairs, the initialiser stream of the extra modules, the teacher model, the transfer set's labels."""

    config: Any
    num_classes: int
    student_shapes: list
    teacher_shapes: list
    pairs: tuple
    dtype: Any
    rngs: Any
    teacher_model: Any = None
    train_labels: Any = None

    @property
    def knobs(self):
        return self.config.loss[self.config.loss.name]


@dataclasses.dataclass(frozen=True)
class Method:
    """A training method of `loss.name` (or a role of `extkd reproduce` that trains with another method's objective).

    `objective(ctx) -> (total, unweighted parts, the student's logits)` is a function of the objective
    `Context` (methods/context.py); `loss` names the method whose objective a role trains with (its own when
    empty). `knobs` are its own keys under `loss.<name>` with their defaults, `kinds` their checks (`KINDS`).
    `tune` is the knob tuned on validation: "temperature" (the shared `loss.temperature`), "<knob>" (its own,
    `loss.<name>.<knob>`) or None; `grid` its two-value grid in the `:all` / `:zoo` comparisons: values,
    "temperature" (the preset's KD grid) or "init_stage" (fractions of num_epochs, `INIT_STAGE_FRACTIONS`).
    """

    name: str
    description: str
    family: str = "logits"
    objective: Callable | None = None
    loss: str = ""
    knobs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    kinds: Mapping[str, str] = dataclasses.field(default_factory=dict)
    tune: str | None = None
    grid: tuple[float, ...] | str = ()
    needs: frozenset[str] = frozenset()
    pairing: str = "none"
    connectors: bool = False  # its paired student segments go through learned `Connector`s
    modules: Callable[[Build], dict] | None = None  # the Student's extras (heads, projector, connectors of its own)
    role: bool = True  # a method of `extkd reproduce` (False: an objective only, e.g. a teacher's)
    sees_dropped: bool = False  # reproduce: trained on every class
    augment: str = ""  # reproduce: appended to data.augment, e.g. "+mixup"
    teacher: str = "teacher"  # reproduce: the experiment's teacher run it distils from
    zoo: bool = False  # one of the standard KD baselines (RepDistiller / mdistiller), compared by `with_zoo`
    reads_temperature: bool = True  # its objective reads the shared `loss.temperature` (LS-KD has its own)

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ValueError(f"method name {self.name!r}: expected a Python identifier (it names a config key)")
        if (self.objective is None) == (not self.loss or self.loss == self.name):
            raise ValueError(f"method {self.name!r}: give an objective, or the `loss` of another method, not both")
        for need in self.needs:
            if need not in NEEDS:
                raise ValueError(f"method {self.name!r}: unknown need {need!r}; expected some of {NEEDS}")
        if self.pairing not in PAIRINGS:
            raise ValueError(f"method {self.name!r}: pairing {self.pairing!r}; expected one of {PAIRINGS}")
        for key, kind in self.kinds.items():
            if key not in self.knobs or kind not in KINDS:
                raise ValueError(f"method {self.name!r}: check {key}={kind!r}; expected a knob and one of {KINDS}")
        if self.tune not in (None, "temperature", *self.knobs):
            raise ValueError(f"method {self.name!r}: tune={self.tune!r} is neither 'temperature' nor one of its knobs")

    @property
    def loss_name(self) -> str:
        """The `loss.name` it trains with."""
        return self.loss or self.name

    @property
    def knob(self) -> str | None:
        """The tuned knob's path under `loss`: "temperature", "<name>.<knob>" or None."""
        if self.tune in (None, "temperature"):
            return self.tune
        return f"{self.name}.{self.tune}"

    def knob_value(self, loss_config) -> float:
        """The tuned knob's value in a `loss` config block."""
        return float(loss_config[self.tune] if self.tune == "temperature" else loss_config[self.name][self.tune])

    def set_knob(self, loss_config, value: float) -> None:
        if self.tune == "temperature":
            loss_config.temperature = float(value)
        elif self.tune is not None:
            loss_config[self.name][self.tune] = float(value)

    @property
    def distils(self) -> bool:
        """Whether it learns from a teacher (its objective's needs)."""
        from extkd_jax.methods.registry import get_method

        return "teacher" in get_method(self.loss_name).needs

    @property
    def uses_kd_temperature(self) -> bool:
        """A distilling method that reads the shared temperature and does not tune it runs at the one chosen for KD
        (issue 22)."""
        return self.distils and self.tune != "temperature" and self.reads_temperature
