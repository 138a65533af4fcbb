"""A workdir's identity: the resolved config it was started with (`config.json`), checked on every rerun.

Every path goes through `etils.epath`, so a workdir may be local or remote (`gs://bucket/run`).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import ml_collections
from etils import epath

log = logging.getLogger(__name__)

# Keys that may change between a run and its resumption without changing what is computed.
RESUMABLE_KEYS = (
    "progress",
    "checkpoint_every_epochs",
    "keep_checkpoints",
    "steps_per_dispatch",
    "eval_batch_size",
    "distributed",
    "on_nonfinite",
    "metrics",  # where the scalars are written, and how often: not what the run computes
    "teacher.workdir",  # a moved workdir (e.g. copied back from a TPU VM) is the same experiment
    "teacher.allow_unfinished",  # the teacher itself is checked by its digest (train/teacher.py)
    "data.dir",  # where the dataset is read from (a copy elsewhere, $EXTKD_DATA_DIR), not which dataset it is
    "data.download",  # whether tfds may fetch it
)
# Keys that do not change what a workdir of that kind computed: a single run ignores the experiment's settings,
# and an experiment may be extended (more methods, a dark-knowledge curve, the oracle table) without redoing its runs.
IGNORED_BY_KIND = {
    "train": ("reproduce", "seeds"),
    "distill": ("reproduce", "seeds"),
    "reproduce": (
        "reproduce.methods",
        "reproduce.grid",
        "reproduce.keep_fractions",
        "reproduce.curve_methods",
        "reproduce.oracle_correction",
    ),
}


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def write_text_atomic(path: epath.Path, text: str) -> None:
    """Writes `text` to a temporary sibling, then renames it over `path`: a reader never sees half a file. Locally
    the data is fsync'ed before the rename and the directory after it, so a power cut leaves the old file or the
    new one, never an empty one (an object store's upload is atomic by itself)."""
    tmp = path.parent / (path.name + ".tmp")
    if is_remote(path):
        tmp.write_text(text)
        tmp.replace(path)
        return
    with open(os.fspath(tmp), "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(os.fspath(tmp), os.fspath(path))
    fsync_dir(path.parent)


def is_remote(path: str | epath.PathLike) -> bool:
    return "://" in str(path)


def fsync_dir(directory: epath.Path) -> None:
    """Makes a rename or a new file in a local `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def require_workdir(workdir: str | epath.PathLike) -> epath.Path:
    """The workdir as a Path; a clear error when it is missing or a file."""
    path = epath.Path(workdir)
    check_parents(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"workdir {path} is a file, not a directory")
    if not path.is_dir():
        raise FileNotFoundError(f"workdir {path} does not exist")
    return path


def check_parents(workdir: epath.Path) -> None:
    """Refuses a workdir below a file (`mkdir` would fail with a bare NotADirectoryError), and a workdir (or a
    folder above it) that is a dangling or looping symbolic link (`mkdir` would fail with "File exists")."""
    if not is_remote(workdir):
        for p in [epath.Path(workdir), *list(epath.Path(workdir).parents)[:-1]]:
            if os.path.islink(os.fspath(p)) and not os.path.exists(os.fspath(p)):
                raise ValueError(
                    f"workdir {workdir}: {p} is a symbolic link to {os.readlink(os.fspath(p))!r}, which does not "
                    "exist or loops back on itself; remove or fix the link, or use another --workdir"
                )
    for parent in list(epath.Path(workdir).parents)[:-1]:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"workdir {workdir}: {parent} is a file, not a directory; use another --workdir")
        if parent.exists():
            return


def check_or_write_config(
    workdir: epath.Path,
    config: ml_collections.ConfigDict,
    *,
    kind: str,
    write: bool,
    info: dict | None = None,
) -> None:
    """Writes `config.json` in a new workdir; in an existing one, refuses a config of another experiment
    (unless the workdir holds no result yet: a run that stopped before its first checkpoint).

    `info` (number of classes, input shape, ...) is stored beside the config for loading the model later.
    """
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"workdir {workdir} is a file; expected a directory (new or of the same run)")
    check_parents(workdir)
    path = workdir / "config.json"
    record = {"kind": kind, "config": config_to_dict(config), **(info or {})}
    if path.exists() and not _started(workdir):
        # No result yet: a run that stopped before its first checkpoint or metrics record (a bad input found
        # after the config was written, a NaN in the first epoch). Its config is replaced, so that rerunning
        # with the input corrected is not refused.
        log.info("workdir %s holds no result yet: its config.json is replaced", workdir)
    elif path.exists():
        stored = stored_record(workdir)
        if stored.get("kind") != kind:
            raise ValueError(
                f"workdir {workdir} holds a `{stored.get('kind')}` run; this is a `{kind}` run. Use another --workdir."
            )
        differing = differing_keys(stored["config"], record["config"], kind)
        if differing:
            shown = show_differences(stored["config"], record["config"], differing)
            raise ValueError(
                f"workdir {workdir} holds a different experiment ({shown}); use another --workdir or the same config"
            )
    text = json.dumps(record, indent=2)
    if write and not (path.exists() and path.read_text() == text):  # an identical rerun writes nothing
        workdir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)


def differing_keys(old_config: dict, new_config: dict, kind: str) -> list[str]:
    """The keys (flattened) in which `new_config` is another experiment than `old_config` for a `kind` workdir:
    keys that may change on a resume, and keys a newer version added at their default, are not counted."""
    old, new = flatten(old_config), flatten(new_config)
    defaults = _defaults()
    return sorted(
        k
        for k in set(old) | set(new)
        if old.get(k) != new.get(k)
        # a key a newer version added, at its default (what the older version did), or one it removed
        and not (k not in old and new.get(k) == defaults.get(k, object()))
        and k in new
        and k.split(".")[0] not in RESUMABLE_KEYS
        and k not in RESUMABLE_KEYS
        and not any(k == i or k.startswith(i + ".") for i in IGNORED_BY_KIND.get(kind, ()))
        # the cosine / step schedules depend on the run length; a constant rate does not
        and not (k == "num_epochs" and new.get("optim.schedule") == "constant")
    )


def check_checkpoint_record(recorded: dict | None, record: dict, checkpoint: str) -> None:
    """Refuses to resume `checkpoint`, whose meta records the run it was written by (`recorded`: kind, config,
    teacher), under another experiment's `record`: config.json alone is not the workdir's identity (it may have been
    deleted, the documented fix for a damaged one, and the command rerun with another config). Checkpoints of
    older versions record nothing and are not checked."""
    if not recorded:
        return
    kind = record["kind"]
    if recorded.get("kind") != kind:
        raise ValueError(f"{checkpoint} was written by a `{recorded.get('kind')}` run; this is a `{kind}` run")
    differing = differing_keys(recorded.get("config") or {}, record["config"], kind)
    shown = [show_differences(recorded.get("config") or {}, record["config"], differing)] if differing else []
    old_teacher = (recorded.get("teacher") or {}).get("variables_sha256")
    new_teacher = (record.get("teacher") or {}).get("variables_sha256")
    if old_teacher and new_teacher and old_teacher != new_teacher:
        shown.append(f"teacher SHA-256: {old_teacher[:12]}... -> {new_teacher[:12]}...")
    if shown:
        raise ValueError(
            f"{checkpoint} was written by another experiment than this command's ({'; '.join(shown)}: the "
            "checkpoint's value -> this command's). Rerun with the config it was written with, or use another "
            "--workdir"
        )


def show_differences(old_config: dict, new_config: dict, keys: list[str]) -> str:
    old, new = flatten(old_config), flatten(new_config)
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:6])


def _defaults() -> dict[str, Any]:
    """configs/base.py, flattened: what a key absent from an older workdir's config.json meant."""
    from extkd_jax.configs import base

    return flatten(config_to_dict(base.get_config()))


def _started(workdir: epath.Path) -> bool:
    """Whether a workdir holds results: anything besides its config, an empty `checkpoints` folder (created
    before the first step) and an empty metrics log."""
    for p in workdir.iterdir():
        if p.name in ("config.json", "config.json.tmp", ".lock"):
            continue
        if p.name == "checkpoints" and p.is_dir() and not any(True for _ in p.iterdir()):
            continue
        if p.name == "metrics.jsonl" and p.is_file() and not p.read_text().strip():
            continue
        return True
    return False


def read_json(path: epath.Path, fix: str) -> Any:
    """A JSON file's content; a ValueError naming the file and `fix` when it is not readable JSON."""
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {fix}") from None


CONFIG_FIX = (
    "it was cut short or edited by hand: delete it and rerun the command that made this workdir "
    "(its checkpoints are kept and the run resumes)"
)


def stored_record(workdir: str | epath.PathLike) -> dict | None:
    """The record of a workdir's config.json (kind, config, info), None when there is none."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        return None
    record = read_json(path, CONFIG_FIX)
    if not isinstance(record, dict) or "config" not in record:
        raise ValueError(f"{path} holds no `config` record; {CONFIG_FIX}")
    return record


def read_config(workdir: str | epath.PathLike) -> tuple[dict, ml_collections.ConfigDict]:
    """(record, config) stored in a workdir; FileNotFoundError when it holds no run."""
    stored = stored_record(workdir)
    if stored is None:
        raise FileNotFoundError(
            f"{epath.Path(workdir) / 'config.json'} not found: {workdir} is not the workdir of an `extkd` run"
        )
    return stored, ml_collections.ConfigDict(_tuples(stored["config"]))


def _tuples(value):
    """JSON turns tuples into lists; configs use tuples."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value
