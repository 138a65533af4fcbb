"""The Python API: what `extkd train` / `distill` / `reproduce` run, as functions (re-exported by `extkd_jax`).

    import extkd_jax
    from extkd_jax import configs

    config = configs.get("digits_omit3", "teacher", **{"num_epochs": 20})
    extkd_jax.train(config, "/tmp/teacher")            # loss.name 'ce' trains; a teacher loss distils
    extkd_jax.reproduce("digits_omit3", "/tmp/omit3")  # the whole experiment
    model = extkd_jax.load("/tmp/teacher")

Both resume a workdir that holds the same run, and refuse one that holds another, as the commands do.
"""

from __future__ import annotations

import os
from typing import Any

from extkd_jax._extras import needs_extras

TRAIN_LOSSES = ("ce", "purf")  # losses that use no teacher: `extkd train`; every other loss distils


def _config_of(config: Any, overrides: dict):
    from extkd_jax import configs

    if isinstance(config, (str, os.PathLike)):
        return configs.get(os.fspath(config), **overrides)
    if overrides:  # on a copy: the caller's config stays as it was
        config = config.copy_and_resolve_references()
    for key, value in overrides.items():
        configs.override(config, key, value)
    return config


def train(config: Any, workdir: str | os.PathLike, **overrides: Any) -> dict:
    """Trains (loss.name 'ce' / 'purf') or distils (any other loss, from `teacher.workdir`) one model into `workdir`
    (local or gs://); returns the last epoch's metrics record. Resumes a workdir holding the same run.

    `config`: a ConfigDict (`configs.get(...)`) or a preset's name ("digits_omit3:teacher"); `overrides`: dotted
    keys, `**{"optim.learning_rate": 0.01}`. An experiment preset (kind 'experiment') goes to `reproduce`.
    """
    with needs_extras("extkd_jax.train"):  # a losses-only install: the error names the extra to install
        return _train(config, workdir, **overrides)


def reproduce(config: Any, workdir: str | os.PathLike, *, preset: str = "", **overrides: Any):
    """The dark-knowledge experiment of an experiment preset into `workdir` (teacher, every method over seeds,
    results.json, report.md, plots); returns its `experiment.results.Results`. Finished runs are reused.

    `config`: a preset's name ("digits_omit3", "cifar10_drop:cpu") or a ConfigDict; `preset` names the experiment
    in the report (default: the preset's name, else the workdir's name).
    """
    with needs_extras("extkd_jax.reproduce"):
        return _reproduce_experiment(config, workdir, preset=preset, **overrides)


def _train(config: Any, workdir: str | os.PathLike, **overrides: Any) -> dict:
    """`train`'s body, inside the extras guard."""
    config = _config_of(config, overrides)
    if config.get("kind", "run") == "experiment":
        raise ValueError(
            "an experiment config (kind='experiment') runs with extkd_jax.reproduce(config, workdir); for one of its "
            "runs name a role, e.g. configs.get(name, 'teacher') or configs.get(name, 'kd')"
        )
    from extkd_jax.train.loop import train_and_evaluate

    mode = "train" if config.loss.name in TRAIN_LOSSES else "distill"
    return train_and_evaluate(config, workdir, mode=mode)


def _reproduce_experiment(config: Any, workdir: str | os.PathLike, *, preset: str = "", **overrides: Any):
    """`reproduce`'s body, inside the extras guard."""
    name = os.fspath(config) if isinstance(config, (str, os.PathLike)) else ""
    config = _config_of(config, overrides)
    if config.get("kind", "run") != "experiment":
        raise ValueError(
            f"config.kind={config.get('kind', 'run')!r} configures one run: use extkd_jax.train(config, workdir); "
            "reproduce takes an experiment preset (kind='experiment'), e.g. 'digits_omit3'"
        )
    from extkd_jax.experiment.reproduce import reproduce as _reproduce

    preset = (
        preset
        or os.path.basename(name.partition(":")[0]).removesuffix(".py")
        or os.path.basename(os.fspath(workdir).rstrip("/"))
    )
    command = f"extkd_jax.reproduce({repr(name) if name else 'config'}, {os.fspath(workdir)!r})"
    return _reproduce(config, workdir, preset=preset, command_line=command)
