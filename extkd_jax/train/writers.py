"""Metric writers: where a run's scalars and hyperparameters go, behind clu's `MetricWriter` interface.

A writer has ``write_scalars(step, scalars)``, ``write_hparams(hparams)``, ``flush()`` and ``close()`` (the part of
``clu.metric_writers.MetricWriter`` a run uses, so clu's own writers fit too). Built in, chosen by
``config.metrics.writers``:

- ``"jsonl"``: ``<workdir>/scalars.jsonl``, one ``{"step": ..., "<tag>": ...}`` line per write (what TensorBoard
  gets, as JSON lines), and ``<workdir>/hparams.json``;
- ``"tensorboard"``: event files under ``<workdir>/tensorboard/`` (the ``tensorboard`` package's own writer, no
  TensorFlow), the hyperparameters as an hparams-plugin summary and a text summary;
- ``"wandb"``: a Weights & Biases run (``pip install 'extkd_jax[wandb]'``); its id is kept in
  ``<workdir>/wandb_run_id``, so a resumed run continues the same W&B run.

Every step is the global step (the number of updates applied). On a resume from step S, what the writers hold past
S (written after the checkpoint, before the run stopped) is dropped: scalars.jsonl is cut back to S, and
TensorBoard is told by a ``SessionLog.START`` event at S + 1, on which it discards the orphaned events.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from etils import epath

from extkd_jax.train.workdir import flatten, is_remote, write_text_atomic

log = logging.getLogger(__name__)

WRITERS = ("jsonl", "tensorboard", "wandb")


@runtime_checkable
class MetricWriter(Protocol):
    """clu's `MetricWriter`, the part a run uses."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def write_hparams(self, hparams: Mapping[str, Any]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def check_writer_names(names: Any) -> tuple[str, ...]:
    """`config.metrics.writers` as a tuple of known names; a ValueError naming an unknown one (with a suggestion)."""
    if isinstance(names, str):
        names = tuple(n.strip() for n in names.split(",") if n.strip())
    if not isinstance(names, Sequence):
        raise ValueError(f"metrics.writers={names!r}: expected a tuple of names from {WRITERS}")
    for name in names:
        if name not in WRITERS:
            close = difflib.get_close_matches(str(name), WRITERS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"metrics.writers: unknown writer {name!r}{hint}; expected names from {WRITERS}")
    if len(set(names)) != len(names):
        raise ValueError(f"metrics.writers={tuple(names)!r}: a writer is named twice")
    return tuple(names)


def flatten_hparams(config: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """A config (nested dict) flattened to ``{"loss.temperature": 4.0, ...}``; values that are not a bool, a number
    or a string (tuples, None) become their JSON text, which every writer accepts."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in sorted(flatten(dict(config)).items()):
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
        else:
            out[key] = json.dumps(value)
    return out


class JsonlWriter:
    """Scalars as JSON lines in ``<workdir>/scalars.jsonl`` (appended at each flush; rewritten whole on an object
    store, which has no append) and the hyperparameters in ``<workdir>/hparams.json``."""

    def __init__(self, workdir: epath.Path, resume_step: int = 0):
        self.path = workdir / "scalars.jsonl"
        self._hparams_path = workdir / "hparams.json"
        self._pending: list[str] = []
        self._lines: list[str] = []  # kept for the object-store rewrite
        if self.path.exists():
            kept, dropped = [], 0
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    dropped += 1
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= resume_step:
                    kept.append(line)
                else:
                    dropped += 1
            self._lines = kept
            if dropped:  # the lines past the checkpoint (or torn) go; the rerun writes them again
                write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._pending.append(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._hparams_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self._hparams_path, json.dumps(dict(hparams), indent=2, sort_keys=True) + "\n")

    def flush(self) -> None:
        if not self._pending:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lines.extend(self._pending)
        if is_remote(self.path):
            write_text_atomic(self.path, "".join(line + "\n" for line in self._lines))
        else:
            with open(os.fspath(self.path), "a", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in self._pending))
        self._pending = []

    def close(self) -> None:
        self.flush()


class TensorBoardWriter:
    """Scalars as TensorBoard events in `logdir` (local or remote), via tensorboard's event writer."""

    def __init__(self, logdir: epath.Path, resume_step: int = 0):
        from tensorboard.compat.proto import event_pb2, summary_pb2  # lazy: the [train] extra
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        self.logdir = logdir
        self._remote = is_remote(logdir)
        local = tempfile.mkdtemp(prefix="extkd_tb_") if self._remote else os.fspath(logdir)
        os.makedirs(local, exist_ok=True)
        self._writer = EventFileWriter(local)
        # TensorBoard drops the events of steps > resume_step that earlier files hold (written after the checkpoint)
        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        self._writer.add_event(event_pb2.Event(step=resume_step + 1, wall_time=time.time(), session_log=start))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        values = [self._summary_pb2.Summary.Value(tag=tag, simple_value=float(v)) for tag, v in scalars.items()]
        self._add(step, self._summary_pb2.Summary(value=values))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        from tensorboard.plugins.hparams import summary_v2 as hp
        from tensorboard.plugins.text import summary_v2 as text

        self._add(0, hp.hparams_pb(dict(hparams)))
        table = "\n".join(f"| {k} | {v} |" for k, v in hparams.items())
        self._add(0, text.text_pb("config", "| key | value |\n|---|---|\n" + table))

    def _add(self, step: int, summary) -> None:
        self._writer.add_event(self._event_pb2.Event(step=int(step), wall_time=time.time(), summary=summary))

    def flush(self) -> None:
        self._writer.flush()
        if self._remote:  # event files are append-only: copy the whole file up
            local = epath.Path(self._writer.get_logdir())
            self.logdir.mkdir(parents=True, exist_ok=True)
            for path in local.iterdir():
                (self.logdir / path.name).write_bytes(path.read_bytes())

    def close(self) -> None:
        self.flush()
        self._writer.close()


class WandbWriter:
    """A Weights & Biases run (``wandb`` imported only here: the optional ``[wandb]`` extra). Its id lives in
    ``<workdir>/wandb_run_id``: a resumed run logs into the same W&B run. `mode` "" leaves wandb's own default
    (``WANDB_MODE``); "offline" writes under ``<workdir>/wandb`` for a later ``wandb sync``."""

    def __init__(self, workdir: epath.Path, project: str, entity: str = "", mode: str = ""):
        try:
            import wandb
        except ImportError as err:
            raise ImportError(
                "metrics.writers names 'wandb' but the wandb package is not installed: pip install 'extkd_jax[wandb]'"
            ) from err
        id_path = workdir / "wandb_run_id"
        run_id = id_path.read_text().strip() if id_path.exists() else uuid.uuid4().hex[:16]
        if not id_path.exists():
            workdir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(id_path, run_id + "\n")
        local = tempfile.mkdtemp(prefix="extkd_wandb_") if is_remote(workdir) else os.fspath(workdir)
        kwargs = {"project": project, "dir": local, "id": run_id, "resume": "allow", "name": workdir.name}
        if entity:
            kwargs["entity"] = entity
        if mode:
            kwargs["mode"] = mode
        self._run = wandb.init(**kwargs)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._run.log({k: float(v) for k, v in scalars.items()}, step=int(step))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._run.config.update(dict(hparams), allow_val_change=True)

    def flush(self) -> None:
        pass  # wandb streams on its own

    def close(self) -> None:
        """Finish the run. wandb's service may write an offline run's file out shortly after this returns; the file
        is complete once the process exits (or after ``wandb.teardown()``)."""
        self._run.finish()


class MultiWriter:
    """Several writers as one: each call goes to every writer, in order."""

    def __init__(self, writers: Sequence[MetricWriter]):
        self.writers = list(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        for w in self.writers:
            w.write_hparams(hparams)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()


def make_writers(names: Sequence[str], workdir: epath.Path, resume_step: int = 0, settings: Any = None) -> MultiWriter:
    """The writers `names` for `workdir`, resuming at global step `resume_step`. A missing tensorboard package skips
    TensorBoard with a warning; a missing wandb (asked for by name) is an error. `settings`: config.metrics."""
    writers: list[MetricWriter] = []
    for name in check_writer_names(names):
        if name == "jsonl":
            writers.append(JsonlWriter(workdir, resume_step))
        elif name == "tensorboard":
            try:
                writers.append(TensorBoardWriter(workdir / "tensorboard", resume_step))
            except ImportError:
                log.warning("tensorboard is not installed: no TensorBoard events (pip install 'extkd_jax[train]')")
        else:
            get = settings.get if settings is not None else (lambda key, default: default)
            writers.append(
                WandbWriter(workdir, get("wandb_project", "extkd_jax"), get("wandb_entity", ""), get("wandb_mode", ""))
            )
    return MultiWriter(writers)


def step_scalars(step_metrics: Mapping[str, np.ndarray], index: int) -> dict[str, float]:
    """The finite per-step values of step `index` of a dispatch (loss, its parts, learning rate, ...), tagged
    ``train_step/<name>``; the non-finite flag is left out (a skipped step shows as its missing loss)."""
    out = {}
    for key, values in step_metrics.items():
        value = float(np.asarray(values)[index])
        if key != "nonfinite" and np.isfinite(value):
            out[f"train_step/{key}"] = value
    return out


def metric_settings(config: Any) -> tuple[tuple[str, ...], int, Any]:
    """(writer names, log_every_steps, config.metrics) of a run's config, checked; a config without a `metrics`
    block (written by an older version) gets the defaults of configs/base.py."""
    metrics = config.get("metrics") if hasattr(config, "get") else None
    if metrics is None:
        return ("jsonl", "tensorboard"), 50, None
    every = metrics.get("log_every_steps", 50)
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 0:
        raise ValueError(f"metrics.log_every_steps={every!r}: expected an integer >= 0 (0: epoch records only)")
    return check_writer_names(metrics.get("writers", ("jsonl", "tensorboard"))), int(every), metrics
