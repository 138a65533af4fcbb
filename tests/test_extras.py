"""Installs without the extras: every entry point names the extra to install instead of a bare ModuleNotFoundError.

The installs are real: a `python -m venv` whose import path holds this checkout and, as symlinks into this
interpreter's site-packages, only the distributions that `pip install extkd_jax` (jax, chex, numpy and what they
require) or `pip install "extkd_jax[train]"` would install. Namespace folders (google/) come whole: good enough, since
the modules these tests miss on purpose (flax, etils, gcsfs, ...) are top-level.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

from extkd_jax._extras import EXTRAS, MissingExtraError, extra_of, hint_for, install_hint, needs_extras
from tests.tiny import REPO_ROOT

TRAIN_HINT = 'needs the training extras: pip install "extkd_jax[train]"'
GCS_HINT = 'needs gcsfs for gs:// paths: pip install "extkd_jax[gcs]"'


def _setup_cfg_extras() -> dict[str, list[str]]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO_ROOT / "setup.cfg")
    return {k: [r for r in v.split("\n") if r.strip()] for k, v in cfg["options.extras_require"].items()}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requires(name: str) -> list[str]:
    """A distribution's requirements; extkd_jax's from setup.cfg (an editable install's metadata may be older)."""
    if name != "extkd_jax":
        try:
            return importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:  # not installed here (e.g. the docs extra)
            return []
    cfg = configparser.ConfigParser()
    cfg.read(REPO_ROOT / "setup.cfg")
    base = [r for r in cfg["options"]["install_requires"].split("\n") if r.strip()]
    extras = [f"{r}; extra == '{e}'" for e, reqs in _setup_cfg_extras().items() for r in reqs if not r.startswith("#")]
    return base + extras


def _closure(extras: tuple[str, ...]) -> set[str]:
    """The distributions that `pip install "extkd_jax[extras]"` installs (normalised names, extkd_jax excluded)."""
    seen: set[tuple[str, tuple[str, ...]]] = set()
    todo = [("extkd_jax", set(extras))]
    while todo:
        name, wanted = todo.pop()
        for text in _requires(name):
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in wanted | {""}):
                continue
            key = _norm(req.name)
            if key == "extkd-jax":
                todo.append(("extkd_jax", set(req.extras)))
            elif (key, tuple(sorted(req.extras))) not in seen:
                seen.add((key, tuple(sorted(req.extras))))
                todo.append((req.name, set(req.extras)))
    return {key for key, _ in seen}


def _make_env(root: pathlib.Path, extras: tuple[str, ...]) -> pathlib.Path:
    """A venv seeing this checkout (laid out as the wheel does) and only the distributions of `extkd_jax[extras]`."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=120)
    deps = root / "deps"
    deps.mkdir()
    for name in _closure(extras):
        dist = importlib.metadata.distribution(name)  # fails for a missing one, naming it
        tops = {pathlib.PurePath(f).parts[0] for f in dist.files or [] if ".." not in pathlib.PurePath(f).parts}
        for top in tops - {"__pycache__"}:
            target = pathlib.Path(dist.locate_file(top))
            if target.exists() and not (deps / top).exists():
                (deps / top).symlink_to(target)
    # the package as the wheel lays it out: extkd_jax/ with the top-level configs/ as extkd_jax/configs
    package = root / "pkg" / "extkd_jax"
    package.mkdir(parents=True)
    for entry in (REPO_ROOT / "extkd_jax").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    (package / "configs").symlink_to(REPO_ROOT / "configs")
    (site,) = (root / "venv" / "lib").glob("python*/site-packages")
    (site / "extkd_env.pth").write_text(f"{deps}\n{root / 'pkg'}\n")
    return root / "venv" / "bin" / "python"


def _python(python: pathlib.Path, code: str, cwd: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(
        [str(python), "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_extra_of_and_hints():
    assert extra_of("etils.epath") == "train" and extra_of("sklearn") == "digits" and extra_of("gcsfs") == "gcs"
    assert extra_of("extkd_jax.train") is None and extra_of(None) is None
    assert install_hint("extkd train", "train") == f"extkd train {TRAIN_HINT}"
    with pytest.raises(ValueError, match="'gpu'.*train, plots"):
        install_hint("x", "gpu")
    assert hint_for(ModuleNotFoundError("No module named 'flax'", name="flax"), "x") == f"x {TRAIN_HINT}"
    assert hint_for(ImportError("Please install gcsfs to access Google Storage"), "x") == f"x {GCS_HINT}"
    ours = ImportError("plots need matplotlib: pip install 'extkd_jax[plots]'")
    assert hint_for(ours, "extkd reproduce") == f"extkd reproduce: {ours}"
    assert hint_for(ModuleNotFoundError("No module named 'nope'", name="nope"), "x") is None


def test_needs_extras_keeps_other_errors():
    with pytest.raises(MissingExtraError, match=re.escape(f"extkd_jax.load {TRAIN_HINT}")) as info:
        with needs_extras("extkd_jax.load"):
            raise ModuleNotFoundError("No module named 'etils.epath'", name="etils.epath")
    assert isinstance(info.value, ModuleNotFoundError) and info.value.name == "etils.epath"
    with pytest.raises(ModuleNotFoundError) as info:
        with needs_extras("x"):
            import a_module_of_no_extra  # noqa: F401
    assert not isinstance(info.value, MissingExtraError)


def test_hints_name_the_extras_of_setup_cfg():
    extras = _setup_cfg_extras()
    assert set(EXTRAS) <= set(extras), set(EXTRAS) - set(extras)
    assert extras["all"] == ["extkd_jax[train,plots,digits,tfds,stream,gcs]"]
    assert {"extkd_jax[all,docs]", "wheel>=0.40", "build>=1.0", "torch==2.13.0"} <= set(extras["test"])
    # each extra's modules come from distributions that extra installs (its closure in this environment)
    by_module = importlib.metadata.packages_distributions()
    for extra, (_, modules) in EXTRAS.items():
        closure = _closure((extra,))
        for module in modules:
            if module in by_module:
                assert {_norm(d) for d in by_module[module]} & closure, (extra, module, by_module[module])


@pytest.mark.slow
def test_losses_only_install_names_the_extra(tmp_path):
    python = _make_env(tmp_path, ())
    workdir = tmp_path / "work"
    code = """
import contextlib, io, json, sys
import numpy as np
import extkd_jax
from extkd_jax.cli import main
from extkd_jax.losses import kd_kl

out = {"kd_kl": float(kd_kl(np.array([[1.0, 2.0]]), np.array([[1.0, 2.0]]), temperature=2.0))}
for module in ("flax", "etils", "ml_collections", "optax", "orbax"):
    try:
        __import__(module)
        out[module] = "importable"
    except ModuleNotFoundError:
        pass
try:
    extkd_jax.load(sys.argv[1])
except ModuleNotFoundError as err:
    out["load"] = [type(err).__name__, str(err)]
for argv in (["reproduce"], ["train", "--config=smoke"], ["distill", "--config=smoke"], ["evaluate"], ["report"]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([*argv, "--workdir=" + sys.argv[1]])
    out[argv[0]] = [rc, err.getvalue()]
with contextlib.redirect_stdout(io.StringIO()):
    out["help"] = [main(["reproduce", "--help"]), main(["--version"])]
print(json.dumps(out))
"""
    run = _python(python, code, tmp_path, str(workdir))
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["kd_kl"] == pytest.approx(0.0, abs=1e-6)  # the losses work
    assert not [m for m in ("flax", "etils", "ml_collections", "optax", "orbax") if m in out]  # the env is real
    assert out["load"] == ["MissingExtraError", f"extkd_jax.load {TRAIN_HINT}"]
    for command in ("reproduce", "train", "distill", "evaluate", "report"):
        assert out[command] == [1, f"extkd {command} {TRAIN_HINT}\n"], command
    assert out["help"] == [0, 0]
    assert not workdir.exists()
    # the command line itself: one line on stderr, no traceback
    cli = _python(python, "from extkd_jax.cli import main; raise SystemExit(main())", tmp_path, "reproduce")
    assert (cli.returncode, cli.stderr) == (1, f"extkd reproduce {TRAIN_HINT}\n")


@pytest.mark.slow
def test_gs_workdir_without_gcsfs_names_the_gcs_extra(tmp_path):
    python = _make_env(tmp_path, ("train", "digits"))
    code = """
import sys
from extkd_jax.cli import main
for module in ("gcsfs", "tensorflow"):  # tensorflow would give etils another way to gs://
    try:
        __import__(module)
        sys.exit(module + " is importable")
    except ModuleNotFoundError:
        pass
sys.exit(main(["train", "--config=smoke:teacher", "--workdir=gs://no-such-bucket/run"]))
"""
    run = _python(python, code, tmp_path)
    assert (run.returncode, run.stderr.strip().splitlines()[-1:]) == (1, [f"extkd train {GCS_HINT}"]), run.stderr
    assert "Traceback" not in run.stderr
