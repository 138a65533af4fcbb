"""`extkd`: the command line. Parses flags (absl + ml_collections config files) and dispatches.

extkd train      --config=mnist_teacher --workdir=/tmp/teacher
extkd distill    --config=mnist_student --workdir=/tmp/student --config.teacher.workdir=/tmp/teacher
extkd evaluate   --workdir=/tmp/student
extkd reproduce  [--config=digits_omit3] --workdir=/tmp/omit3
extkd report     --workdir=/tmp/omit3
"""

from __future__ import annotations

import ast
import importlib.resources
import json
import logging
import pathlib
import re
import shlex
import sys

COMMANDS = {
    "train": "train one model alone: a teacher (`--config=<experiment>:teacher`) or a student with loss.name=ce",
    "distill": "distill a student from a trained teacher (--config.teacher.workdir)",
    "evaluate": "evaluate the newest checkpoint of a workdir (writes eval.json)",
    "reproduce": "the dark-knowledge experiment: teacher, every method, results.json, report.md, plots",
    "import-torch": "a teacher workdir from torchvision ResNet weights (--weights=STATE_DICT.pth)",
    "report": "print the summary table of a reproduced experiment (DIR/results.json), as the README shows it",
    "config": "print a preset's resolved config as JSON, every key (defaults included), overrides applied",
}
DATA_COMMAND = "extkd data prepare NAME --out=DIR [--from=PATH]: a dataset's npz folder (CIFAR, MNIST files, tfds)"
NO_CONFIG = ("evaluate", "report")
DEFAULT_PRESET = {"reproduce": "digits_omit3"}
KINDS = {"train": "run", "distill": "run", "reproduce": "experiment", "import-torch": "run"}
CONFIG_DOCS = "every config key, with its default and meaning: extkd_jax/configs/base.py (README: Config reference)"


EXIT_ALL_DIVERGED = 3  # `extkd reproduce`: every method diverged (the report is written, naming them)


class UsageError(Exception):
    """A bad command line: printed without a traceback, exit status 2."""


def preset_names() -> list[str]:
    """The presets shipped in the package (`extkd_jax.configs`), by name."""
    files = importlib.resources.files("extkd_jax.configs").iterdir()
    return sorted(f.name[:-3] for f in files if f.name.endswith(".py") and f.name not in ("__init__.py", "base.py"))


def config_file(value: str) -> str:
    """`PATH[:variant]` or a preset `NAME[:variant]` -> the config file's path, with its `:variant`."""
    path, sep, variant = value.partition(":")
    if pathlib.Path(path).is_file():
        return value
    preset = importlib.resources.files("extkd_jax.configs") / (pathlib.Path(path).name.removesuffix(".py") + ".py")
    if preset.is_file() and preset.name != "base.py":
        return str(preset) + sep + variant
    from extkd_jax.configs import did_you_mean

    raise UsageError(
        f"--config={value}: no such config file; expected a path or one of the presets: {', '.join(preset_names())}."
        + did_you_mean(pathlib.Path(path).name.removesuffix(".py"), preset_names())
    )


def usage(command: str | None = None) -> str:
    if command is None:
        lines = [
            "usage: extkd COMMAND --config=PRESET[:variant] --workdir=DIR [--config.key=value ...]",
            "",
            "commands:",
        ] + [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
        lines += [f"  {'data':<10} {DATA_COMMAND}"]
        lines += ["", "extkd COMMAND --help shows a command's flags; extkd --version the version"]
    else:
        config = "" if command in NO_CONFIG else " --config=PRESET[:variant]"
        overrides = "" if command == "report" else " [--config.key=value ...]"
        workdir = {
            "report": "an experiment's directory (local or gs://), holding results.json",
            "evaluate": "a trained run's directory (local or gs://); its newest readable checkpoint is scored",
            "import-torch": "the teacher workdir to write (local or gs://)",
        }.get(command, "the run's directory (local or gs://); rerunning the same command resumes")
        lines = [
            f"usage: extkd {command}{config} --workdir=DIR{overrides}",
            "",
            COMMANDS[command],
            "",
            "flags:",
            f"  --workdir=DIR       {workdir}",
        ]
        if command == "config":
            lines = [f"usage: extkd config PRESET[:variant]{overrides}", "", COMMANDS[command], "", "flags:"]
        if command == "import-torch":
            lines = [lines[0].replace(" --workdir=DIR", " --workdir=DIR --weights=FILE"), *lines[1:]]
            lines += ["  --weights=FILE      required: a torchvision ResNet state_dict file (.pth)"]
        if command not in NO_CONFIG:
            default = DEFAULT_PRESET.get(command)
            lines += [
                "  --config=PRESET     a preset name or a config file path; `:variant` is passed to its",
                "                      get_config (sizes such as `cpu`, roles such as `teacher`)"
                + (f"; default {default}" if default else ""),
                "  --config.KEY=VALUE  override one config key (e.g. --config.num_epochs=5)",
            ]
        elif command == "evaluate":
            lines += ["  --config=PRESET     optional: evaluate with another data config than the run's"]
    lines += ["", f"presets: {', '.join(preset_names())}", CONFIG_DOCS]
    return "\n".join(lines)


def _import_plugins(args: list[str]) -> None:
    """Imports the modules named by `--config.imports=...` before the config is built, so that the methods they
    register own config keys (`loss.<method>.<knob>`, `reproduce.grid.<method>`) that later flags can set."""
    from extkd_jax.models.registry import import_modules

    for arg in args:
        if not arg.startswith("--config.imports="):
            continue
        value = arg.split("=", 1)[1]
        try:
            modules = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            modules = value
        modules = (modules,) if isinstance(modules, str) else modules
        if not isinstance(modules, tuple | list) or not all(isinstance(m, str) for m in modules):
            raise UsageError(f"{arg}: expected a module name or a tuple of them, e.g. \"('my_methods',)\"")
        try:
            import_modules(modules, "--config.imports")
        except ValueError as err:
            raise UsageError(str(err)) from None


def parse_flags(command: str, args: list[str]):
    """(config or None, workdir, weights or None) from `--config=... --config.key=value --workdir=...`."""
    from absl import flags
    from ml_collections import config_flags

    given = [a for a in args if a.startswith("--config=")]
    if not given and command in DEFAULT_PRESET:
        args = [f"--config={DEFAULT_PRESET[command]}"] + args
    elif not given and command not in NO_CONFIG:
        needs = "a PRESET[:variant]" if command == "config" else "--config=PRESET"
        raise UsageError(f"`extkd {command}` needs {needs}; presets: {', '.join(preset_names())}")
    args = [f"--config={config_file(a.split('=', 1)[1])}" if a.startswith("--config=") else a for a in args]
    argv = [f"extkd {command}"] + args
    _import_plugins(args)
    flag_values = flags.FlagValues()  # one per call: the CLI is also called in-process (tests, notebooks)
    flags.DEFINE_string("workdir", None, "directory of the run", flag_values=flag_values)
    flags.DEFINE_string("weights", None, "import-torch: a torchvision ResNet state_dict file", flag_values=flag_values)
    # ml_collections loads every config file as module "config_config" and re-executes a new file inside the module
    # already in sys.modules: a file without get_config() would inherit the previous file's. Start from nothing.
    sys.modules.pop("config_config", None)
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=flag_values, sys_argv=argv)
    try:
        rest = flag_values(argv)
        config = flag_values.config
    except (AttributeError, KeyError) as err:
        if "get_config" in str(err):
            raise UsageError(f"{given[0] if given else '--config'} defines no get_config() function") from None
        unknown = _unknown_key([a for a in args if a.startswith("--config=")][-1:], args)
        if unknown:
            raise UsageError(f"{unknown} See {CONFIG_DOCS.split(': ', 1)[1]}, or `extkd config PRESET`") from None
        # ml_collections nests reprs: "'\\'epochs\\'\\nDid you mean ...'"; keep the key and the suggestion
        detail = " ".join(str(err).replace("\\n", " ").replace("\\'", "'").replace('\\"', '"').split())
        key = re.search(r"'([\w.]+)'", detail)
        hint = detail[detail.find("Did you mean") :].rstrip("'\"") if "Did you mean" in detail else ""
        raise UsageError(
            f"unknown config key {key.group(0) if key else detail}: {hint}".strip(": ")
            + f"; see {CONFIG_DOCS.split(': ', 1)[1]}"
        ) from None
    except SyntaxError as err:
        raise UsageError(f"--config file {err.filename}, line {err.lineno}: {err.msg}") from None
    except (flags.Error, OSError) as err:
        message = str(err).strip().splitlines()
        # a ValueError inside get_config (e.g. an unknown variant) arrives wrapped with its traceback
        raise UsageError(message[-1] if "Error whilst parsing config file" in str(err) else message[0]) from None
    except Exception as err:  # noqa: BLE001 - get_config() itself raised: the user's file, not ours
        where = given[0] if given else "--config"
        raise UsageError(f"{where}: get_config() raised {type(err).__name__}: {err}") from None
    if given or command in DEFAULT_PRESET:
        _check_config_object(config, given[0] if given else f"--config={DEFAULT_PRESET[command]}")
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments {rest[1:]}; flags are --config, --config.KEY=VALUE, --workdir")
    if command == "config" and flag_values.workdir:
        raise UsageError("`extkd config` takes no --workdir: it prints the config and runs nothing")
    if not flag_values.workdir and command != "config":
        raise UsageError(f"`extkd {command}` needs --workdir=DIR")
    if config is not None and command == "report":
        raise UsageError("`extkd report` takes only --workdir (the experiment's results.json is its input)")
    if config is not None and command in KINDS and config.get("kind", "run") != KINDS[command]:
        raise UsageError(_wrong_kind(command, config.get("kind", "run"), given[0] if given else ""))
    if (command == "import-torch") != bool(flag_values.weights):
        raise UsageError("--weights=FILE goes with `extkd import-torch` (and it needs one)")
    return config, flag_values.workdir, flag_values.weights


def _unknown_key(config_flag: list[str], args: list[str]) -> str | None:
    """The first `--config.KEY` of `args` that the config of `config_flag` (["--config=PATH[:variant]"]) lacks,
    named with the closest dotted key; None if none is unknown (or the config cannot be read here)."""
    from extkd_jax import configs

    try:
        keys = configs.flat_keys(configs.get(config_flag[0].split("=", 1)[1]))
    except Exception:  # noqa: BLE001 - ml_collections' own message is shown instead
        return None
    for arg in args:
        key = arg.removeprefix("--config.").split("=", 1)[0]
        if arg.startswith("--config.") and key not in keys and not any(k.startswith(key + ".") for k in keys):
            return f"unknown config key {key!r} ({arg}).{configs.did_you_mean(key, keys)}"
    return None


def _check_config_object(config, given: str) -> None:
    """get_config() must return a ConfigDict holding every key of configs/base.py."""
    import ml_collections

    if not isinstance(config, ml_collections.ConfigDict):
        raise UsageError(
            f"{given}: get_config() returned {type(config).__name__}, expected an ml_collections.ConfigDict "
            "(start from `from extkd_jax.configs import base; config = base.get_config()`)"
        )
    from extkd_jax.configs import base
    from extkd_jax.train.workdir import config_to_dict, flatten

    missing = sorted(set(flatten(config_to_dict(base.get_config()))) - set(flatten(config_to_dict(config))))
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise UsageError(
            f"{given}: the config lacks keys every run needs: {shown}; build presets on configs/base.py "
            "(`from extkd_jax.configs import base; config = base.get_config()`, then change what differs)"
        )


def _wrong_kind(command: str, kind: str, given: str) -> str:
    if kind == "experiment":
        return (
            f"{given} is an experiment preset (config.kind='experiment'): `extkd reproduce` runs it; "
            f"for one of its runs name a role: {given}:teacher (extkd train) or {given}:kd (extkd distill)"
        )
    return f"{given} configures one run (config.kind={kind!r}); use `extkd train` or `extkd distill` with it"


def _enable_compilation_cache() -> None:
    """Reuses compiled programs across runs (`reproduce` trains many same-shaped models)."""
    import os

    import jax

    from extkd_jax.train.xla_cache import sweep_incomplete

    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.expanduser("~/.cache/extkd_jax/xla")
    sweep_incomplete(cache)  # entries a killed run cut short: JAX would warn and recompile them forever
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run(command: str, config, workdir: str, command_line: str, weights: str | None = None) -> dict:
    """Runs one parsed command; returns its result record."""
    if command == "import-torch":
        from extkd_jax.train.import_torch import import_teacher

        return {"workdir": import_teacher(config, weights, workdir), "model": config.model.name}
    if command == "config":
        from extkd_jax.train.workdir import config_to_dict

        return config_to_dict(config)
    if command in ("train", "distill"):
        from extkd_jax.train.loop import train_and_evaluate

        return train_and_evaluate(config, workdir, mode=command)
    if command == "evaluate":
        from extkd_jax.train.evaluate import evaluate_workdir

        return evaluate_workdir(workdir, config)
    if command == "report":
        from extkd_jax.experiment.report import readme_table_of

        return {"table": readme_table_of(workdir)}
    from extkd_jax.experiment.reproduce import reproduce

    preset = next(
        (a.split("=", 1)[1] for a in shlex.split(command_line) if a.startswith("--config=")),
        DEFAULT_PRESET["reproduce"],
    )
    return reproduce(config, workdir, preset=pathlib.Path(preset.partition(":")[0]).stem, command_line=command_line)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        from extkd_jax import __version__

        print(f"extkd_jax {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    if command == "data":  # `extkd data prepare ...`: its own flags and help (extkd_jax/data/prepare.py)
        return _data_command(args)
    if command not in COMMANDS:
        print(f"extkd: error: unknown command {command!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help", "--helpfull") for a in args):
        print(usage(command))
        return 0
    from extkd_jax._extras import MissingExtraError, needs_extras

    try:
        with needs_extras(f"extkd {command}"):
            return _run_command(command, args)
    except MissingExtraError as err:  # a losses-only install: name the extra, no traceback
        print(err, file=sys.stderr)
        return 1


def _data_command(args: list[str]) -> int:
    from extkd_jax._extras import MissingExtraError, needs_extras

    try:
        with needs_extras("extkd data"):
            from extkd_jax.data.prepare import main as data_main

            return data_main(args)
    except MissingExtraError as err:
        print(err, file=sys.stderr)
        return 1


def _run_command(command: str, args: list[str]) -> int:
    """Parses, runs and prints one command (`extkd COMMAND ARGS`); its exit status."""
    from extkd_jax.train.lock import WorkdirLockedError

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("extkd_jax").setLevel(logging.INFO)
    if command == "config" and args[:1] and not args[0].startswith("-"):
        args = [f"--config={args[0]}", *args[1:]]  # extkd config PRESET[:variant]
    try:
        config, workdir, weights = parse_flags(command, args)
        if command == "config":
            print(json.dumps(run(command, config, "", ""), indent=2))
            return 0
        _enable_compilation_cache()
        result = run(command, config, workdir, shlex.join(["extkd", command, *args]), weights)
    except UsageError as err:
        print(f"extkd: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError, FloatingPointError, WorkdirLockedError) as err:  # bad input; held or read-only dir
        print(f"extkd {command}: error: {err}", file=sys.stderr)
        return 1
    if command == "report":
        print(result["table"])
        return 0
    status = 0
    if not isinstance(result, dict):  # reproduce's Results
        diverged = sorted(result.diverged)
        if diverged and not result.methods:  # nothing to compare: not a success, though the report is written
            print(
                f"extkd reproduce: error: every method diverged ({', '.join(diverged)}): no method has figures; "
                f"see {workdir}/report.md (exit status {EXIT_ALL_DIVERGED})",
                file=sys.stderr,
            )
            status = EXIT_ALL_DIVERGED
        result = {"report": f"{workdir}/report.md", "wall_time_s": result.wall_time_s}
        if diverged:
            result["diverged"] = ", ".join(diverged) + " (left out: a run stopped on a non-finite loss; see the report)"
    summary = {k: v for k, v in result.items() if not isinstance(v, (list, dict))}
    print(json.dumps(summary, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
