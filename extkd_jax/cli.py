"""`extkd`: the command line. Parses flags and dispatches; no training logic lives here.

extkd train      --config=configs/mnist_teacher.py --workdir=/tmp/teacher
extkd distill    --config=configs/mnist_student.py --workdir=/tmp/student --config.teacher.workdir=/tmp/teacher
extkd evaluate   --workdir=/tmp/student
extkd reproduce  [--config=configs/digits_omit3.py] --workdir=/tmp/omit3
"""

from __future__ import annotations

import json
import logging
import pathlib
import re
import sys

COMMANDS = {
    "train": "train a teacher, or a student alone (loss.name='ce')",
    "distill": "distill a student from a trained teacher (teacher.workdir)",
    "evaluate": "evaluate the newest checkpoint of a workdir",
    "reproduce": "the dark-knowledge experiment: teacher, every method, report",
}
CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIGS = {"reproduce": "digits_omit3.py"}


class UsageError(Exception):
    """A bad command line: printed without a traceback, exit status 2."""


def _usage() -> str:
    lines = [
        "usage: extkd COMMAND --config=configs/<preset>.py --workdir=DIR [--config.key=value ...]",
        "",
        "commands:",
    ]
    lines += [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
    lines += ["", f"presets: {', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.py')))}"]
    return "\n".join(lines)


def resolve_config_path(value: str) -> str:
    """Accepts a path, a path relative to the repo, or a bare preset name; keeps a `:param` suffix."""
    path, sep, param = value.partition(":")
    candidates = [
        pathlib.Path(path),
        CONFIG_DIR / pathlib.Path(path).name,
        CONFIG_DIR / (pathlib.Path(path).name + ".py"),
    ]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate) + sep + param
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.py")))
    raise UsageError(f"--config={value}: no such config file; expected a path or one of the presets: {known}")


def preset_name(args: list[str], command: str) -> str:
    config_arg = next((a for a in args if a.startswith("--config=")), None)
    if config_arg is None:
        return pathlib.Path(DEFAULT_CONFIGS.get(command, "")).stem
    return pathlib.Path(config_arg.split("=", 1)[1].partition(":")[0]).stem


def apply_scale(config, args: list[str]) -> None:
    """Applies `config.scales[config.scale]` (a preset's named size) except keys given on the command line."""
    if not config.get("scale"):
        return
    scales = config.get("scales") or {}
    if config.scale not in scales:
        raise UsageError(f"--config.scale={config.scale}: expected one of {sorted(scales)} for this preset")
    explicit = {a.split("=", 1)[0][len("--config.") :] for a in args if a.startswith("--config.")}

    def merge(target, overrides, prefix):
        for key, value in overrides.items():
            path = f"{prefix}{key}"
            if hasattr(value, "items"):
                merge(target[key], value, path + ".")
            elif path not in explicit:
                target[key] = value

    with config.unlocked():
        merge(config, scales[config.scale], "")


def _check_config_file(path: str) -> None:
    """Loads the config file once to turn a broken file into a clear message (config_flags would trace back)."""
    import importlib.util

    file = path.partition(":")[0]
    spec = importlib.util.spec_from_file_location("extkd_config_check", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise UsageError(f"--config={file} could not be loaded: {type(err).__name__}: {err}") from None
    if not callable(getattr(module, "get_config", None)):
        raise UsageError(f"--config={file} defines no get_config() function")


def parse_flags(command: str, args: list[str]):
    """Returns (config, workdir) from `--config=... --config.key=value --workdir=...`."""
    from absl import flags
    from ml_collections import config_flags

    config_arg = next((a for a in args if a.startswith("--config=")), None)
    if config_arg is None:
        default = DEFAULT_CONFIGS.get(command)
        if default is None and command != "evaluate":
            raise UsageError(f"`extkd {command}` needs --config=configs/<preset>.py")
        args = ([f"--config={CONFIG_DIR / default}"] if default else []) + args
    else:
        args = [
            f"--config={resolve_config_path(config_arg.split('=', 1)[1])}" if a is config_arg else a
            for a in args
        ]
    # presets import `configs.base`: make the repository's configs package importable from any directory
    if str(CONFIG_DIR.parent) not in sys.path:
        sys.path.insert(0, str(CONFIG_DIR.parent))
    config_path = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
    if config_path:
        _check_config_file(config_path)
    flag_values = flags.FlagValues()
    flags.DEFINE_string(
        "workdir", None, "directory of the run (resumed if it exists)", flag_values=flag_values
    )
    argv = ["extkd"] + args
    old_argv = sys.argv
    sys.argv = argv  # config_flags reads overrides from sys.argv when the flag is defined
    try:
        config_flags.DEFINE_config_file(
            "config", None, "config file", flag_values=flag_values, lock_config=True
        )
        flag_values(argv)
        config = flag_values.config
    except (AttributeError, KeyError) as err:
        keys = re.findall(r"--config\.([\w.]+)=", " ".join(args))
        raise UsageError(
            f"unknown config key ({err}); keys given: {keys}. See configs/base.py for every key"
        ) from None
    except flags.Error as err:
        raise UsageError(str(err)) from None
    except OSError as err:
        raise UsageError(str(err).splitlines()[0]) from None
    finally:
        sys.argv = old_argv
    if config is not None:
        apply_scale(config, args)
    if not flag_values.workdir:
        raise UsageError(f"`extkd {command}` needs --workdir=DIR")
    return config, flag_values.workdir


def _enable_compilation_cache() -> None:
    """Reuses compiled programs across runs (`reproduce` trains many same-shaped models)."""
    import os

    import jax

    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.expanduser("~/.cache/extkd_jax/xla")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("extkd_jax").setLevel(logging.INFO)
    _enable_compilation_cache()
    try:
        if command not in COMMANDS:
            raise UsageError(f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}")
        config, workdir = parse_flags(command, args)
        if command in ("train", "distill"):
            from extkd_jax.train.loop import train_and_evaluate

            result = train_and_evaluate(config, workdir, mode=command)
        elif command == "evaluate":
            from extkd_jax.train.loop import evaluate_workdir

            result = evaluate_workdir(workdir, config)
        else:
            from extkd_jax.experiment.reproduce import reproduce

            result = reproduce(config, workdir, preset=preset_name(args, command))
    except UsageError as err:
        print(f"extkd: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        print(f"extkd {command}: error: {err}", file=sys.stderr)
        return 1
    summary = {k: v for k, v in result.items() if not isinstance(v, (list, dict))}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
