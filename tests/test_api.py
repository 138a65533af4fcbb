"""The Python API (extkd_jax.train / reproduce / configs.get), `python -m extkd_jax`, `extkd config`, the help text,
and the loaded model as a pure function (`model.apply`: jit, vmap, grad) with its pixel-range check."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import extkd_jax
from extkd_jax import cli, configs
from tests.conftest import CONSTANT
from tests.tiny import REPO_ROOT, tiny_config


def _test_images(data_dir, n: int = 40) -> np.ndarray:
    return np.load(data_dir / "test.npz")["x_test"][:n]  # uint8 (n, 8, 8), no channel axis


def _cli(args, capsys) -> tuple[int, str, str]:
    status = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return status, out.out, out.err


# ------------------------------------------------------------------------------------------------ the package


def test_import_stays_light_and_the_api_is_reachable(repo_root):
    code = (
        "import sys, extkd_jax\n"
        "heavy = [m for m in ('flax', 'optax', 'orbax', 'ml_collections') if m in sys.modules]\n"
        "assert callable(extkd_jax.train) and callable(extkd_jax.reproduce), 'api'\n"
        "heavy += [m for m in ('flax', 'optax', 'orbax') if m in sys.modules]\n"
        "print(heavy, sorted(n for n in ('train', 'reproduce', 'load') if hasattr(extkd_jax, n)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] ['load', 'reproduce', 'train']"


def test_train_stays_callable_after_its_subpackage_is_imported():
    import extkd_jax.train.loop  # noqa: F401 - what used to replace a function named `train` by the subpackage

    assert callable(extkd_jax.train) and extkd_jax.train.loop.train_and_evaluate


def test_python_dash_m_is_the_cli(repo_root):
    version = subprocess.run(
        [sys.executable, "-m", "extkd_jax", "--version"], capture_output=True, text=True, timeout=60, cwd=repo_root
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"extkd_jax {extkd_jax.__version__}"
    unknown = subprocess.run([sys.executable, "-m", "extkd_jax", "trian"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "unknown command 'trian'" in unknown.stderr


# ------------------------------------------------------------------------------------------------ configs.get


def test_configs_get_equals_what_the_command_line_resolves(capsys):
    """configs.get and `extkd config` (ml_collections' config flags) give the same config, defaults included."""
    config = configs.get("digits_omit3", "teacher", **{"optim.learning_rate": 0.01, "num_epochs": 7})
    status, out, err = _cli(
        ["config", "digits_omit3:teacher", "--config.optim.learning_rate=0.01", "--config.num_epochs=7"], capsys
    )
    assert status == 0, err
    printed = json.loads(out)
    assert printed == json.loads(config.to_json_best_effort())
    assert printed["optim"]["learning_rate"] == 0.01 and printed["num_epochs"] == 7
    base = json.loads(configs.get(str(REPO_ROOT / "configs/smoke.py")).to_json_best_effort())  # a path works too
    assert set(configs.flat_keys(configs.base.get_config())) <= set(configs.flat_keys(configs.get("smoke")))
    assert base["kind"] == "experiment"
    assert configs.get("digits_omit3:teacher").to_dict() == configs.get("digits_omit3", "teacher").to_dict()


@pytest.mark.parametrize(
    "call,fragments",
    [
        (
            lambda: configs.get("digits_omit3", **{"optim.learning_rat": 0.1}),
            ["'optim.learning_rat'", '"optim.learning_rate"'],
        ),
        (lambda: configs.get("digits_omit3", **{"epochs": 3}), ["'epochs'", '"num_epochs"']),
        (lambda: configs.get("mnist_teachr"), ["'mnist_teachr'", '"mnist_teacher"', "digits_omit3"]),
        (lambda: configs.get("digits_omit3:cpu", "teacher"), ["variant given twice"]),
        (lambda: configs.get("digits_omit3", **{"optim.learning_rate": "fast"}), ["'optim.learning_rate'", "fast"]),
    ],
    ids=["nested_key", "top_level_key", "preset", "variant_twice", "wrong_type"],
)
def test_configs_get_names_what_is_wrong(call, fragments):
    with pytest.raises(ValueError) as err:
        call()
    for fragment in fragments:
        assert fragment in str(err.value)


def test_a_plugins_knobs_and_grid_are_config_keys_on_the_command_line(capsys, examples_plugins):
    """`--config.imports` is imported before the config is built: the plug-in's `loss.<method>.<knob>` and
    `reproduce.grid.<method>` can be set by the flags that follow; an unimportable module is a usage error."""
    from extkd_jax.configs import base  # imported before the plug-in, as in a long-lived process

    assert "cosine_kd" not in base.get_config().reproduce.grid
    status, out, err = _cli(
        [
            "config",
            "smoke",
            "--config.imports=('custom_method',)",
            "--config.loss.cosine_kd.weight=3.0",
            "--config.reproduce.grid.cosine_kd=(1.0, 4.0)",
        ],
        capsys,
    )
    assert status == 0, err
    printed = json.loads(out)
    assert printed["loss"]["cosine_kd"]["weight"] == 3.0 and printed["reproduce"]["grid"]["cosine_kd"] == [1.0, 4.0]
    status, out, err = _cli(["config", "smoke", "--config.imports=('no_such_plugin_module',)"], capsys)
    assert status == 2 and not out and "cannot import the module 'no_such_plugin_module'" in err


@pytest.mark.parametrize(
    "args,fragments",
    [
        (
            ["config", "digits_omit3", "--config.optim.learning_rat=0.1"],
            ["'optim.learning_rat'", '"optim.learning_rate"'],
        ),
        (
            ["train", "--config=mnist_teacher", "--config.optim.learning_rat=0.1", "--workdir=/nowhere"],
            ['"optim.learning_rate"'],
        ),
        (["config", "digits_omt3"], ["digits_omt3", '"digits_omit3"']),
        (["config"], ["needs a PRESET"]),
        (["config", "smoke", "--workdir=/tmp/x"], ["takes no --workdir"]),
    ],
    ids=["config_nested_key", "train_nested_key", "preset", "no_preset", "workdir"],
)
def test_cli_unknown_key_or_preset_exits_2_with_a_suggestion(args, fragments, capsys):
    status, out, err = _cli(args, capsys)
    assert status == 2 and not out
    assert "Traceback" not in err and err.startswith("extkd: error:")
    for fragment in fragments:
        assert fragment in err


# ------------------------------------------------------------------------------------------------ help text


def test_help_text_of_import_torch_and_evaluate(capsys):
    status, out, _ = _cli(["import-torch", "--help"], capsys)
    assert status == 0
    assert "--weights=FILE" in out.splitlines()[0] and "  --weights=FILE      required" in out
    _, out, _ = _cli(["evaluate", "--help"], capsys)
    assert "resumes" not in out and "newest readable checkpoint" in out
    _, out, _ = _cli(["train", "--help"], capsys)
    assert "rerunning the same command resumes" in out and "--weights" not in out
    _, out, _ = _cli(["config", "--help"], capsys)
    assert out.startswith("usage: extkd config PRESET[:variant]") and "--workdir" not in out
    _, out, _ = _cli(["--help"], capsys)
    assert "  config " in out


# ------------------------------------------------------------------------------------------------ train / reproduce


def test_api_refuses_the_wrong_kind_of_config(tmp_path):
    with pytest.raises(ValueError, match=r"extkd_jax.reproduce\(config, workdir\)"):
        extkd_jax.train("digits_omit3", tmp_path / "a")
    with pytest.raises(ValueError, match=r"extkd_jax.train\(config, workdir\)"):
        extkd_jax.reproduce("digits_omit3:teacher", tmp_path / "b")
    assert not list(tmp_path.iterdir())


def test_reproduce_passes_the_preset_name(monkeypatch, tmp_path):
    import extkd_jax.experiment.reproduce as module

    calls = []
    monkeypatch.setattr(module, "reproduce", lambda config, workdir, **kw: calls.append((config, workdir, kw)))
    extkd_jax.reproduce("digits_omit3", tmp_path / "x", **{"seeds": 2})
    config, workdir, kw = calls[0]
    assert config.seeds == 2 and workdir == tmp_path / "x"
    assert kw == {"preset": "digits_omit3", "command_line": f"extkd_jax.reproduce('digits_omit3', '{tmp_path / 'x'}')"}


@pytest.mark.slow
def test_api_train_is_the_engine_and_distils_by_loss(finished, data_dir, tmp_path):
    """extkd_jax.train(config) reproduces the `finished` run (same config, `extkd train`'s engine) exactly; a teacher
    loss distils from teacher.workdir."""
    from extkd_jax.train.workdir import read_config

    config = tiny_config(data_dir, keep_checkpoints=3, **CONSTANT)
    extkd_jax.train(config, tmp_path / "again")
    a, b = extkd_jax.load(finished), extkd_jax.load(tmp_path / "again")
    jax.tree.map(np.testing.assert_array_equal, a.variables, b.variables)
    student = tiny_config(data_dir, num_epochs=1)
    record = extkd_jax.train(student, tmp_path / "kd", **{"loss.name": "kd", "teacher.workdir": str(finished)})
    assert np.isfinite(record["train_loss"]) and student.loss.name == "ce"  # overrides apply to a copy
    assert read_config(tmp_path / "kd")[0]["kind"] == "distill"


# ------------------------------------------------------------------------------------------------ the loaded model


def _mlp_reference(model, images: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The tiny MLP by hand in float64 numpy: normalise, Linear-ReLU per hidden layer, Linear."""
    norm = model.card["normalization"]
    x = (images.reshape(len(images), -1).astype(np.float64) - norm["mean"][0]) / norm["std"][0]  # one channel
    params = jax.tree.map(np.asarray, model.variables["params"])
    hidden = []
    for i in range(len(params["hidden"])):
        layer = params["hidden"][i] if i in params["hidden"] else params["hidden"][str(i)]
        x = np.maximum(x @ layer["kernel"] + layer["bias"], 0)
        hidden.append(x)
    return x @ params["out"]["kernel"] + params["out"]["bias"], hidden


def test_apply_is_pure_and_equals_the_model(finished, data_dir):
    model = extkd_jax.load(finished)
    images = _test_images(data_dir)
    reference, hidden = _mlp_reference(model, images)
    assert all(isinstance(leaf, jax.Array | np.ndarray) for leaf in jax.tree.leaves(model.variables))
    jitted = jax.jit(model.apply)(model.variables, images)
    np.testing.assert_allclose(jitted, reference, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(model(images), jitted, rtol=1e-6, atol=1e-6)
    logits, segments = jax.jit(model.apply, static_argnames="segments")(model.variables, images, segments=True)
    np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-4)
    for got, want in zip(segments, hidden, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # vmap over a leading axis: two batches at once
    stacked = np.stack([images[:20], images[20:]])
    batched = jax.vmap(model.apply, in_axes=(None, 0))(model.variables, stacked)
    np.testing.assert_allclose(batched.reshape(40, -1), reference, rtol=1e-5, atol=1e-4)
    # another set of variables gives other logits: apply reads its argument, not the model's own arrays
    zeroed = jax.tree.map(jnp.zeros_like, model.variables)
    assert not np.allclose(jax.jit(model.apply)(zeroed, images), jitted)


def test_gradient_with_respect_to_images_matches_finite_differences(finished, data_dir):
    model = extkd_jax.load(finished)
    images = _test_images(data_dir, 4).astype(np.float32)
    direction = np.random.default_rng(0).normal(size=images.shape).astype(np.float32)

    weights = np.random.default_rng(1).normal(size=(len(images), model.num_classes)).astype(np.float32)

    def f(x):
        return jnp.sum(weights * model.apply(model.variables, x))

    grad = jax.jit(jax.grad(f))(jnp.asarray(images))
    assert grad.shape == images.shape and float(jnp.abs(grad).max()) > 0
    # central differences of the float64 reference (equal to the model, test above), a step far below any ReLU kink
    eps = 1e-4
    plus, _ = _mlp_reference(model, images.astype(np.float64) + eps * direction)
    minus, _ = _mlp_reference(model, images.astype(np.float64) - eps * direction)
    numeric = float(np.sum(weights * (plus - minus))) / (2 * eps)
    np.testing.assert_allclose(float(jnp.vdot(grad, direction)), numeric, rtol=1e-4)


def test_card_records_the_pixel_convention_and_the_model_refuses_other_ranges(finished, data_dir):
    model = extkd_jax.load(finished)
    assert model.card["input"] == {"dtype": "uint8", "range": [0, 255]}
    images = _test_images(data_dir)
    cases = [
        (images / 255.0, ["[0, 1]", "look scaled to [0, 1]", "[0, 255]", "multiply them by 255"]),
        (images.astype(np.int32) + 300, [f"[{int(images.min()) + 300}, {int(images.max()) + 300}]", "[0, 255]"]),
        (images.astype(np.float32) - 1, ["[-1, ", "[0, 255]"]),
    ]
    for bad, fragments in cases:
        with pytest.raises(ValueError) as err:
            model(bad)
        for fragment in fragments + ["check_range=False"]:
            assert fragment in str(err.value), (fragment, str(err.value))
    np.testing.assert_allclose(model(images / 255.0, check_range=False), model.apply(model.variables, images / 255.0))
    np.testing.assert_allclose(model(images.astype(np.float32)), model(images), rtol=1e-6)  # floats on 0..255: fine


def test_a_checkpoint_without_the_input_field_loads_as_uint8(copy_of_finished, data_dir):
    """Checkpoints written before the card's `input` field: loaded, and checked as uint8 0..255."""
    from extkd_jax.train.checkpoint import Checkpointer

    model = extkd_jax.load(copy_of_finished)
    old_card = {k: v for k, v in model.card.items() if k != "input"}
    checkpointer = Checkpointer(copy_of_finished)
    try:
        checkpointer.save(99, {"model": model.variables, "card": old_card, "meta": {}})
    finally:
        checkpointer.close()
    old = extkd_jax.load(copy_of_finished)
    assert "input" not in old.card and old.input == {"dtype": "uint8", "range": [0, 255]}
    images = _test_images(data_dir)
    np.testing.assert_array_equal(old(images), model(images))
    with pytest.raises(ValueError, match=r"look scaled to \[0, 1\]"):
        old(images / 255.0)


def test_digits_card_names_their_scaling_and_raw_digits_are_refused():
    """sklearn's digits come as floats 0..16; the engine trains on x * 255 // 16 (data/sources.py): the card says
    so, and raw digits (21.8% instead of 92.8% when fed silently) are refused, the scaling named."""
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    from extkd_jax.data.sources import open_split
    from extkd_jax.train.model_input import check_pixel_range, input_convention

    convention = input_convention(configs.get("digits_omit3", "teacher").data)
    assert convention == {"dtype": "uint8", "range": [0, 255], "source_range": [0, 16], "scaling": "x * 255 // 16"}
    raw = load_digits().images[1200:1300]  # the test split's first 100, as scikit-learn gives them
    engine = open_split("sklearn", "digits", "test").read(np.arange(100))
    np.testing.assert_array_equal((raw * 255 // 16).astype(np.uint8)[..., None], engine)
    with pytest.raises(ValueError) as err:
        check_pixel_range(raw, convention)
    assert "[0, 16]" in str(err.value) and "x * 255 // 16" in str(err.value)
    check_pixel_range(engine, convention)  # the engine's own images pass


# ------------------------------------------------------------------------------------------------ segments


def test_segments_of_a_builtin_model_need_the_documented_way():
    """A plain `nnx.capture` of a built-in model captures nothing (they sow only in a `sow_segments=True` view, so a
    plain call leaves the model unchanged); `forward_with_segments`, or that view under `nnx.capture`, gives them."""
    from flax import nnx

    from extkd_jax.models import create_model, forward_with_segments

    model = create_model("resnet8", 10, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    logits, plain = nnx.capture(model, nnx.Intermediate)(x)
    assert not [k for k in plain if k in model.segment_names]
    ref_logits, segments = forward_with_segments(model, x, train=False)
    _, viewed = nnx.capture(nnx.view(model, sow_segments=True), nnx.Intermediate)(x)
    assert len(segments) == len(model.segment_names) == 3
    for name, segment in zip(model.segment_names, segments, strict=True):
        np.testing.assert_array_equal(viewed[name].get_value()[0], segment)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-6)
    assert segments[-1].shape[0] == 2 and segments[0].shape[-1] < segments[-1].shape[-1]
