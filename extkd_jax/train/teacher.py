"""The trained teacher a distillation reads: restored, checked against the student's config and data, identified.

A student's workdir records its teacher's identity in config.json (`teacher`: workdir, architecture, checkpoint
step, whether it had finished, SHA-256 of its variables). `distill` refuses a teacher that has not finished
training (unless `teacher.allow_unfinished=True`) and a resumed run whose teacher is not the recorded one.
"""

from __future__ import annotations

import json
from typing import Any

from extkd_jax.train.checkpoint import tree_digest
from extkd_jax.train.evaluate import Restored, restore_checkpoint
from extkd_jax.train.step import Network
from extkd_jax.train.workdir import read_config


def _finished(restored: Restored, workdir) -> tuple[bool, str]:
    """(whether the teacher run completed, what it reached) from its checkpoint's meta and its config."""
    if "imported" in restored.meta:
        return True, "imported weights"
    _, config = read_config(workdir)
    epoch, total = restored.meta.get("epoch"), int(config.num_epochs)
    if epoch is None:  # a checkpoint written mid-epoch (preemption)
        return False, f"a checkpoint in the middle of an epoch (step {restored.step})"
    return int(epoch) >= total, f"epoch {epoch} of {total}"


def _check_architecture(config, card: dict) -> None:
    workdir = config.teacher.workdir
    if config.teacher.name and config.teacher.name != card["model"]["name"]:
        raise ValueError(
            f"the checkpoint in {workdir} is a {card['model']['name']!r}; expected {config.teacher.name!r}"
        )
    given = json.loads(json.dumps(config.teacher.kwargs.to_dict()))
    stored = card["model"]["kwargs"]
    differing = {k: (v, stored.get(k, "<its default>")) for k, v in given.items() if stored.get(k) != v}
    if differing:
        shown = ", ".join(f"{k}={v!r} (the checkpoint has {s!r})" for k, (v, s) in differing.items())
        raise ValueError(
            f"teacher.kwargs does not describe the teacher in {workdir}: {shown}; fix teacher.kwargs or leave it "
            "empty (the architecture is read from the checkpoint)"
        )


def load_teacher(config, num_classes: int, input_shape, dtype: str) -> tuple[tuple[Network, dict], dict[str, Any]]:
    """((Network, variables), identity) of the trained teacher of `config`, checked against the student's data."""
    workdir = config.teacher.workdir
    restored = restore_checkpoint(workdir, dtype)
    card = restored.card
    _check_architecture(config, card)
    if card["num_classes"] != num_classes or tuple(card["input_shape"]) != tuple(input_shape):
        raise ValueError(
            f"teacher.workdir={workdir} holds a model of {card['num_classes']} classes "
            f"on inputs {tuple(card['input_shape'])}; the data has {num_classes} classes and inputs "
            f"{tuple(input_shape)}"
        )
    finished, reached = _finished(restored, workdir)
    if not finished and not config.teacher.get("allow_unfinished", False):
        raise ValueError(
            f"the teacher in {workdir} has not finished training (its newest readable checkpoint is at {reached}); "
            "rerun its `extkd train` command to finish it, or set --config.teacher.allow_unfinished=True"
        )
    identity = {
        "workdir": str(workdir),
        "model": card["model"],
        "step": restored.step,
        "finished": finished,
        "variables_sha256": tree_digest(restored.variables),
    }
    return (restored.network, restored.variables), identity


def check_same_teacher(recorded: dict[str, Any] | None, identity: dict[str, Any], workdir) -> None:
    """Refuses to resume a student with another teacher than the one it started with."""
    if not recorded or recorded.get("variables_sha256") == identity["variables_sha256"]:
        return
    raise ValueError(
        f"{workdir} was distilled from the teacher in {recorded.get('workdir')} (step {recorded.get('step')}, "
        f"SHA-256 {str(recorded.get('variables_sha256'))[:12]}...); teacher.workdir={identity['workdir']} now holds "
        f"another model (step {identity['step']}, SHA-256 {identity['variables_sha256'][:12]}...). Resume with the "
        "original teacher, or distil from this one into another --workdir"
    )
