"""A model of one's own (`register_model` in a user's module) trains, and `extkd evaluate` / `extkd_jax.load` in
new processes find it without a manual import: the config's `imports` and the module that registered the model are
recorded in the workdir (config.json, the checkpoint's card) and imported again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from extkd_jax.models import create_model, model_imports, model_names, register_model
from extkd_jax.models.registry import ensure_model
from tests.conftest import REPO_ROOT

USER_MODULE = """
from extkd_jax.models import create_model, register_model


def user_mlp(num_classes, *, rngs, dtype, **kwargs):
    return create_model("mlp", num_classes, rngs=rngs, dtype=dtype, **kwargs)


register_model("{name}", user_mlp)
"""


def _write_plugin(folder, module: str, name: str):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(textwrap.dedent(USER_MODULE.format(name=name)))
    return folder


def _run(args: list[str], pythonpath: list, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(str(p) for p in pythonpath))
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_the_registering_module_is_recorded_for_a_model_of_ones_own(tmp_path, monkeypatch):
    _write_plugin(tmp_path, "plugin_recorded", "plugin_recorded_mlp")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert model_imports("mlp", ("a.b",)) == ("a.b",)  # built in: only the config's imports
    with pytest.raises(ValueError, match="cannot import the module 'no_such_plugin'"):
        ensure_model("plugin_recorded_mlp", ("no_such_plugin",))
    ensure_model("plugin_recorded_mlp", ("plugin_recorded",))  # unknown: imports the module, which registers it
    assert "plugin_recorded_mlp" in model_names()
    assert model_imports("plugin_recorded_mlp") == ("plugin_recorded",)
    assert model_imports("plugin_recorded_mlp", ("x", "plugin_recorded")) == ("x", "plugin_recorded")  # once each
    ensure_model("mlp", ("no_such_plugin",))  # a known name imports nothing


def test_a_model_registered_by_a_script_records_no_module():
    namespace = {"__name__": "__main__", "register_model": register_model, "create_model": create_model}
    exec("register_model('script_mlp', lambda n, **kw: create_model('mlp', n, **kw))", namespace)  # noqa: S102
    assert model_imports("script_mlp") == ()  # a __main__ cannot be imported again: name it in `imports` instead


@pytest.mark.slow
def test_a_plugin_model_trains_evaluates_and_loads_in_new_processes(data_dir, tmp_path):
    plugins = _write_plugin(tmp_path / "plugins", "user_models", "user_mlp")
    workdir = tmp_path / "run"
    flags = [
        f"--config={REPO_ROOT / 'tests/scripts/tiny_config.py'}",
        f"--config.data.dir={data_dir}",
        "--config.model.name=user_mlp",
        "--config.imports=('user_models',)",
        "--config.num_epochs=2",
        f"--workdir={workdir}",
    ]
    train = _run([sys.executable, "-m", "extkd_jax.cli", "train", *flags], [plugins, REPO_ROOT], REPO_ROOT)
    assert train.returncode == 0, train.stderr[-3000:]
    assert json.loads((workdir / "config.json").read_text())["config"]["imports"] == ["user_models"]

    # new processes, from elsewhere, the plug-in's folder importable but imported by nobody by hand
    evaluate = _run([sys.executable, "-m", "extkd_jax.cli", "evaluate", f"--workdir={workdir}"], [plugins], tmp_path)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    scores = json.loads((workdir / "eval.json").read_text())
    code = (
        "import sys, numpy as np, extkd_jax\n"
        f"model = extkd_jax.load({str(workdir)!r})\n"
        "assert 'user_models' in sys.modules and model.card['model']['imports'] == ['user_models']\n"
        f"test = np.load({str(data_dir / 'test.npz')!r})\n"
        "print(float(np.mean(np.argmax(model(test['x_test']), -1) == test['y_test'])))\n"
    )
    load = _run([sys.executable, "-c", code], [plugins], tmp_path)
    assert load.returncode == 0, load.stderr[-3000:]
    np.testing.assert_allclose(float(load.stdout.split()[-1]), scores["test_acc"], atol=1e-6)

    # without the plug-in on the path: the error names the module to make importable
    missing = _run([sys.executable, "-m", "extkd_jax.cli", "evaluate", f"--workdir={workdir}"], [], tmp_path)
    assert missing.returncode != 0
    assert "user_models" in missing.stderr and "user_mlp" in missing.stderr, missing.stderr[-3000:]
