"""The method registry (extkd_jax/methods): every built-in method is one registered object; the engine and
`reproduce` name none of them; a method registered outside the package trains through `extkd reproduce`; each
method's objective is unchanged by the move (values recomputed from the losses themselves)."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from extkd_jax.methods import Method, get_method, loss_names, method_names, register_method, role_names
from extkd_jax.methods.registry import builtin_names
from tests.tiny import REPO_ROOT

NOT_METHODS = {("metrics.py", "ab")}  # open()'s append mode, not the method
ENGINE_FILES = [
    *sorted((REPO_ROOT / "extkd_jax" / "train").glob("*.py")),
    REPO_ROOT / "extkd_jax/experiment/reproduce.py",
]


def _strings(path: pathlib.Path):
    """(line, value) of every string constant of a module that is not a docstring."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


@pytest.mark.parametrize("path", ENGINE_FILES, ids=lambda p: p.name)
def test_the_engine_and_reproduce_name_no_method(path):
    names = set(builtin_names())
    found = []
    for line, value in _strings(path):
        quoted = [n for n in names if f"'{n}'" in value or f'"{n}"' in value]
        if (value in names and (path.name, value) not in NOT_METHODS) or quoted:
            found.append(f"{path.name}:{line}: {value!r}")
    assert not found, "method names in the engine (ask the registry instead): " + "; ".join(found)


def test_the_check_would_catch_a_method_name():
    """The scan above sees a plain literal and a quoted name inside a message, and leaves docstrings alone."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "m.py"
        path.write_text('"""crd"""\nif x == "crd":\n    raise ValueError("loss.name=\'dkd\' needs")\n')
        assert [v for _, v in _strings(path)] == ["crd", "loss.name='dkd' needs"]


def test_registry_names_and_errors():
    assert len(role_names()) == 33 and {"ce", "purf"} <= set(loss_names()) - set(role_names())
    assert set(builtin_names()) <= set(method_names())
    with pytest.raises(ValueError, match=r"unknown method 'dkdd' \(did you mean 'dkd'\?\)"):
        get_method("dkdd")
    from extkd_jax.configs import base
    from extkd_jax.train.config_checks import ConfigError, check_config

    config = base.get_config()
    config.loss.name = "dkdd"
    with pytest.raises(ConfigError, match=r"loss.name='dkdd' \(did you mean 'dkd'\?\): expected one of"):
        check_config(config, "distill")
    with pytest.raises(ValueError, match="already registered"):
        register_method(get_method("kd"))
    with pytest.raises(ValueError, match="neither 'temperature' nor one of its knobs"):
        Method("x_bad", "bad", objective=lambda ctx: None, tune="weight")
    with pytest.raises(ValueError, match="unknown need 'gpu'"):
        Method("x_bad", "bad", objective=lambda ctx: None, needs=frozenset({"gpu"}))


def test_every_method_owns_its_knobs_in_its_namespace():
    """Each method's knobs are `loss.<name>.<knob>` in base's config, at its Method's defaults; the tuned knob and
    the grid fit together; the shared KD terms stay shared."""
    from extkd_jax.configs import base

    c = base.get_config()
    for name in method_names():
        m = get_method(name)
        if m.knobs:
            assert dict(c.loss[name]) == dict(m.knobs), name
        assert set(m.kinds) <= set(m.knobs)
        if m.role and m.distils:
            assert m.tune is not None and (m.grid in ("temperature", "init_stage") or len(m.grid) == 2), name
    for shared in ("temperature", "ce_weight", "kd_weight", "label_smoothing", "segments", "teacher_segments"):
        assert shared in c.loss
    assert not [k for k in c.loss if k.endswith("_weight") and k not in ("ce_weight", "kd_weight")]


@pytest.mark.slow
def test_a_method_defined_outside_the_package_runs_through_reproduce(tmp_path):
    """examples/custom_method.py, copied to a folder outside the checkout, is named in config.imports of an
    `extkd reproduce` started from there: its method is tuned on its own grid and reported in results.json, and the
    workdir records the import for a rerun (which then finds every run done)."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    shutil.copy(REPO_ROOT / "examples" / "custom_method.py", plugins / "custom_method.py")
    workdir = tmp_path / "experiment"
    paths = [str(plugins), str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(paths))
    args = [
        sys.executable,
        "-m",
        "extkd_jax.cli",
        "reproduce",
        "--config=smoke",
        f"--workdir={workdir}",
        "--config.imports=('custom_method',)",
        "--config.reproduce.methods=('kd', 'cosine_kd')",
        "--config.reproduce.primary=('cosine_kd', 'kd')",
        "--config.seeds=1",
    ]
    run = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert set(results["methods"]) == {"kd", "cosine_kd"}
    method = results["methods"]["cosine_kd"]
    assert method["knob"] == "cosine_kd.weight" and sorted(g["value"] for g in method["grid"]) == [0.5, 2.0], method
    assert method["chosen"] in (0.5, 2.0)
    assert json.loads((workdir / "config.json").read_text())["config"]["imports"] == ["custom_method"]
    # a rerun in a new process: the recorded import registers the method again; nothing trains twice
    rerun = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    again = json.loads((workdir / "results.json").read_text())["methods"]["cosine_kd"]
    assert again["chosen"] == method["chosen"] and again["runs"] == method["runs"]


def test_a_tuned_knob_set_on_the_command_line_is_refused_while_a_grid_would_override_it():
    from extkd_jax.configs import base
    from extkd_jax.experiment.runs import check_explicit_knobs

    config = base.get_config()
    config.reproduce.grid.dkd = (2.0, 8.0)
    line = "extkd reproduce --config=smoke --config.loss.dkd.beta=2"
    with pytest.raises(ValueError, match=r"--config.loss.dkd.beta sets the knob .* reproduce.grid.dkd=\(2.0, 8.0\)"):
        check_explicit_knobs(config, ("kd", "dkd"), line)
    check_explicit_knobs(config, ("kd", "dkd"), "extkd reproduce --config.loss.dkd.alpha=2")  # not the tuned knob
    check_explicit_knobs(config, ("kd", "fitnet"), line)  # dkd is not compared
    config.reproduce.grid.dkd = ()  # no grid: the flag's value is the one run
    check_explicit_knobs(config, ("kd", "dkd"), line)
    config.reproduce.grid.kd = (2.0, 4.0)  # the shared temperature is KD's tuned knob
    with pytest.raises(ValueError, match="loss.temperature"):
        check_explicit_knobs(config, ("kd",), "extkd reproduce '--config.loss.temperature=3'")


def test_the_mlkd_ablation_plugins_keep_only_their_levels(examples_plugins):
    """examples/mlkd_ablation.py: each variant's objective is CE + kd_weight x `losses.mlkd` with only its levels
    (checked against the loss itself), tuned like the built-in MLKD (the temperature)."""
    import importlib

    import numpy as np

    from extkd_jax import losses
    from extkd_jax.configs import get as get_preset
    from extkd_jax.methods import Context

    module = importlib.import_module("mlkd_ablation")
    config = get_preset("mnist_omit3")
    rng = np.random.default_rng(0)
    logits, teacher = rng.normal(size=(6, 10)).astype(np.float32), rng.normal(size=(6, 10)).astype(np.float32) * 3
    labels = rng.integers(0, 10, 6)
    targets = np.eye(10, dtype=np.float32)[labels]
    values = set()
    for name, (levels, invariant, _) in module.VARIANTS.items():
        assert get_method(name).knob == get_method("mlkd").knob == "temperature"
        student, frozen = (lambda x: (logits, [])), (lambda x: (teacher, []))
        ctx = Context(config.loss, None, labels, targets, None, 0.0, None, (), student, frozen, None)
        total, parts, _ = get_method(name).objective(ctx)
        want = losses.mlkd(logits, teacher, (20.0, 2.0, 3.0, 5.0, 6.0), batch_invariant=invariant, level_weights=levels)
        np.testing.assert_allclose(parts["mlkd"], want, rtol=1e-6)
        np.testing.assert_allclose(total, 0.1 * parts["ce"] + 0.9 * want, rtol=1e-6)
        values.add(round(float(want), 4))
    assert len(values) == 4  # the four variants differ
    # mlkd_invariant is the built-in MLKD with loss.mlkd.batch_invariant=True (docs/results/README.md says so)
    config.loss.name, config.loss.mlkd.batch_invariant = "mlkd", True
    ctx = Context(config.loss, None, labels, targets, None, 0.0, None, (), student, frozen, None)
    builtin_total, _, _ = get_method("mlkd").objective(ctx)
    config.loss.name = "mlkd_invariant"
    ctx = Context(config.loss, None, labels, targets, None, 0.0, None, (), student, frozen, None)
    np.testing.assert_allclose(get_method("mlkd_invariant").objective(ctx)[0], builtin_total, rtol=1e-6)
