"""The methods `extkd reproduce` compares, and the config of each run: one teacher, students per method and seed
(the table and the role configs live in extkd_jax.methods.roles, below configs/ and the engine).

Every distilling method has one main knob, tuned on validation images of the seen classes over a grid of the
same size for every method (`reproduce.grid.<method>`); scratch students have none.
"""

from __future__ import annotations

import ml_collections

from extkd_jax.methods.roles import (  # noqa: F401 - re-exported: the experiment's names
    METHODS,
    TEACHER_RUNS,
    Method,
    role_config,
    student_config,
    teacher_config,
)


def methods_of(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The methods of an experiment config, checked: known names, no repeats."""
    methods = tuple(config.reproduce.methods)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"reproduce.methods holds {m!r}; expected names from {tuple(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"reproduce.methods={methods} repeats a method")
    return methods


def grid_of(config: ml_collections.ConfigDict, method: str) -> tuple[float, ...]:
    """The values of `method`'s knob tried on validation; (current value,) when no grid is given."""
    spec = METHODS[method]
    if spec.knob is None:
        return ()
    grid = tuple(float(v) for v in config.reproduce.grid.get(method, ()) or ())
    return grid or (float(config.loss[spec.knob]),)


def check_equal_budgets(config: ml_collections.ConfigDict, methods: tuple[str, ...]) -> None:
    """Every distilling method gets a grid of the same size: the same tuning budget."""
    sizes = {m: len(grid_of(config, m)) for m in methods if METHODS[m].distils}
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"unequal tuning budgets: grid sizes {sizes}; give every distilling method "
            "reproduce.grid.<method> of the same length"
        )


def run_name(
    method: str, seed: int, knob_value: float | None = None, keep_fraction: float = 0.0, selection: bool = False
) -> str:
    """The run's directory under the experiment workdir, e.g. `runs/kd/seed_0`, `selection/kd/T4/seed_3`."""
    spec = METHODS[method]
    parts = ["selection" if selection else "runs", method]
    if selection and spec.knob is not None:
        parts.append(f"{spec.knob}={knob_value:g}")
    if keep_fraction:
        parts.append(f"keep_{keep_fraction:g}")
    return "/".join([*parts, f"seed_{seed}"])
