"""The methods `extkd reproduce` compares, and the config of each run: one teacher, students per method and seed
(the table and the role configs live in extkd_jax.methods.roles, below configs/ and the engine).

Every distilling method has one main knob, tuned on validation images of the seen classes over a grid of the
same size for every method (`reproduce.grid.<method>`); scratch students have none. Every distilling objective has
KD's temperature in its KL (each method's objective reads `loss.temperature`): the methods that do not tune it
run at the temperature chosen for KD (`uses_kd_temperature`), so that no method is held to the preset's while KD
tunes it. With `reproduce.teacher_seeds` >= 2 each teacher k has its own seed and its own students.
"""

from __future__ import annotations

import shlex

import ml_collections

from extkd_jax.methods.roles import (  # noqa: F401 - re-exported: the experiment's names
    METHODS,
    TEACHER_RUNS,
    Method,
    role_config,
    student_config,
    teacher_config,
)

TEACHER_SEED_STEP = 1000  # teacher k of reproduce.teacher_seeds trains with seed + k * this (apart from students')


def uses_kd_temperature(method: str) -> bool:
    """Built on KD's KL (every distilling method) without tuning its temperature: runs at the one chosen for KD
    (the method's `uses_kd_temperature`)."""
    return METHODS[method].uses_kd_temperature


def teacher_run(run: str, index: int = 0) -> str:
    """The directory of teacher `index` of a teacher run: `teacher`, `teacher_1`, `teacher_purf_2`..."""
    return run if index == 0 else f"{run}_{index}"


def indexed_teacher_config(config: ml_collections.ConfigDict, run: str, index: int) -> ml_collections.ConfigDict:
    """`teacher_config` of teacher `index` (0 for the first, as before): its own seed."""
    c = teacher_config(config, run)
    c.seed = config.seed + TEACHER_SEED_STEP * index
    return c


def experiment_student_config(
    config: ml_collections.ConfigDict,
    method: str,
    seed: int,
    teacher_workdir: str,
    knob_value: float | None = None,
    keep_fraction: float | None = None,
    temperature: float | None = None,
) -> ml_collections.ConfigDict:
    """`student_config`, with `loss.temperature` set to `temperature` (KD's) for a method that
    `uses_kd_temperature` (None: as configured)."""
    c = student_config(config, method, seed, teacher_workdir, knob_value, keep_fraction)
    if temperature is not None and uses_kd_temperature(method):
        c.loss.temperature = float(temperature)
    return c


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
    """The values of `method`'s knob tried on validation: `reproduce.grid.<method>`, or for a plug-in method the
    config does not name, the grid it declares; (current value,) when no grid is given."""
    spec = METHODS[method]
    if spec.knob is None:
        return ()
    if method in config.reproduce.grid:
        grid = tuple(float(v) for v in config.reproduce.grid[method] or ())
    else:
        grid = tuple(float(v) for v in spec.grid) if isinstance(spec.grid, tuple) else ()
    return grid or (spec.knob_value(config.loss),)


def check_equal_budgets(config: ml_collections.ConfigDict, methods: tuple[str, ...]) -> None:
    """Every distilling method gets a grid of the same size: the same tuning budget."""
    sizes = {m: len(grid_of(config, m)) for m in methods if METHODS[m].distils}
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"unequal tuning budgets: grid sizes {sizes}; give every distilling method "
            "reproduce.grid.<method> of the same length"
        )


def check_explicit_knobs(config: ml_collections.ConfigDict, methods: tuple[str, ...], command_line: str) -> None:
    """Refuses a tuned knob set on the command line (`--config.loss.dkd.beta=2`) while the method's grid has more
    than one value: the grid would override it silently. Either drop the flag or give the grid instead."""
    flags = {a.split("=", 1)[0][len("--config.") :] for a in shlex.split(command_line) if a.startswith("--config.")}
    for method in methods:
        knob, grid = METHODS[method].knob, grid_of(config, method)
        if knob is not None and f"loss.{knob}" in flags and len(grid) > 1:
            raise ValueError(
                f"--config.loss.{knob} sets the knob that `reproduce` tunes for {method!r} over "
                f"reproduce.grid.{method}={grid}, which would override it; drop the flag, or set the grid "
                f"instead (--config.reproduce.grid.{method}='(v,)', with one value for every method: equal budgets)"
            )


def run_name(
    method: str,
    seed: int,
    knob_value: float | None = None,
    keep_fraction: float = 0.0,
    selection: bool = False,
    temperature: float | None = None,
    teacher_index: int = 0,
) -> str:
    """The run's directory under the experiment workdir, e.g. `runs/kd/seed_0`, `selection/kd/temperature=4/seed_3`;
    `temperature`: KD's, named where it is not the preset's (`runs/fitnet/temperature=2/seed_0`); `teacher_index`:
    the students of teacher k >= 1 (`runs/kd/teacher_1/seed_0`). Runs as older versions named them keep their names."""
    spec = METHODS[method]
    parts = ["selection" if selection else "runs", method]
    if temperature is not None and uses_kd_temperature(method):
        parts.append(f"temperature={temperature:g}")
    if teacher_index:
        parts.append(teacher_run("teacher", teacher_index))
    if selection and spec.knob is not None:
        parts.append(f"{spec.knob}={knob_value:g}")
    if keep_fraction:
        parts.append(f"keep_{keep_fraction:g}")
    return "/".join([*parts, f"seed_{seed}"])
