"""Bad inputs refused before anything runs: torch weights files (another file into an imported workdir, NaN
tensors, damaged, unsafe or wrong-shaped `.pth` files), non-finite and absurd config values, model sizes, and a
class with no training example (a warning)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle

import numpy as np
import pytest

from extkd_jax import cli
from extkd_jax.train.config_checks import ConfigError, check_config
from tests.tiny import tiny_config, write_tiny_npz

pytestmark = pytest.mark.fault

IMPORT = ["import-torch", "--config=imagenet_kd:imagenette,teacher", "--config.model.name=resnet18"]
EXPECTED = "torch.save(model.state_dict(), path)"


def _import(weights, workdir, capsys) -> tuple[int, str]:
    code = cli.main([*IMPORT, f"--weights={weights}", f"--workdir={workdir}"])
    return code, capsys.readouterr().err


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory):
    """Two torchvision-layout resnet18 state_dicts (10 classes) with different weights, and the first with a NaN."""
    torch = pytest.importorskip("torch")
    from tests.test_imagenet import _torch_resnet

    folder = tmp_path_factory.mktemp("weights")
    files = {}
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        files[name] = folder / f"{name}.pth"
        torch.save(_torch_resnet(torch, "resnet18", 10).state_dict(), files[name])
    state = torch.load(files["a"], weights_only=True)
    state["fc.weight"][3, 4] = float("nan")
    state["layer2.1.bn1.running_var"][0] = float("inf")
    files["nan"] = folder / "nan.pth"
    torch.save(state, files["nan"])
    return files


# ------------------------------------------------------------------------------------------- torch weights files


@pytest.mark.slow
def test_import_of_other_weights_into_an_imported_workdir_is_refused(resnet18_files, tmp_path, capsys):
    """H2: the step-0 checkpoint is written once; a second file must not be recorded over the first's weights."""
    a, b = resnet18_files["a"], resnet18_files["b"]
    workdir = tmp_path / "imported"
    code, err = _import(a, workdir, capsys)
    assert code == 0, err
    record = json.loads((workdir / "config.json").read_text())
    assert record["imported_from"] == str(a) and record["imported_sha256"] == _sha256(a)
    card = json.loads((workdir / "checkpoints" / "0" / "card" / "metadata").read_text())
    assert card["imported_sha256"] == _sha256(a)
    before = (workdir / "config.json").read_text()

    code, err = _import(b, workdir, capsys)
    assert code == 1
    for named in (str(a), str(b), _sha256(a), _sha256(b), "new --workdir"):
        assert named in err
    assert (workdir / "config.json").read_text() == before  # nothing rewritten
    assert _import(a, workdir, capsys)[0] == 0  # the same file again: a rerun, accepted


def test_import_of_weights_with_nan_is_refused_naming_the_tensors(resnet18_files, tmp_path, capsys):
    """M5: a NaN teacher would only show as students stopping on a non-finite loss."""
    code, err = _import(resnet18_files["nan"], tmp_path / "imported", capsys)
    assert code == 1
    assert f"--weights={resnet18_files['nan']}" in err
    assert "'fc.weight' (1 NaN, 0 inf" in err and "'layer2.1.bn1.running_var' (0 NaN, 1 inf" in err
    assert not (tmp_path / "imported").exists()  # refused before anything is written


def _bad_weights(kind: str, path, torch) -> None:
    if kind == "missing":
        return
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "text":
        path.write_text("not a weights file\n")
    elif kind == "truncated":
        torch.save({"fc.weight": torch.ones(10, 512), "fc.bias": torch.zeros(10)}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "list":
        torch.save([torch.ones(10, 512), torch.zeros(10)], path)
    elif kind == "not_tensors":
        torch.save({"epoch": 3, "fc.weight": torch.ones(10, 512)}, path)
    elif kind == "whole_module":
        torch.save(torch.nn.Linear(512, 10), path)
    elif kind == "malicious":  # the zip format torch.save writes
        torch.save({"fc.weight": _CodeRunningPickle(path.parent / "ran")}, path)
    elif kind == "malicious_raw":  # a bare pickle (the legacy format)
        path.write_bytes(pickle.dumps({"fc.weight": _CodeRunningPickle(path.parent / "ran")}, protocol=4))


class _CodeRunningPickle:
    """A pickle that creates a file when unpickled with weights_only=False."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize(
    "kind, says",
    [
        ("missing", "cannot be read (FileNotFoundError"),
        ("empty", "the file is empty"),
        ("garbage", "not a PyTorch file"),
        ("text", "not a PyTorch file"),
        ("truncated", "truncated or not a PyTorch file"),
        ("list", "it holds a list, not a dict of tensors"),
        ("not_tensors", "entries that are not tensors: 'epoch' (int)"),
        ("whole_module", "a whole model (saved with torch.save(model)): torch.nn.modules.linear.Linear"),
        ("malicious", "a Python object that is not a tensor: posix.mkdir"),
        ("malicious_raw", "holds objects other than tensors"),
    ],
)
def test_bad_weights_file_is_named_without_unsafe_advice(kind, says, tmp_path, capsys):
    """L4: one line naming --weights and what was expected; never torch's advice to load with weights_only=False
    (which would run the file's code: the malicious file's code never runs)."""
    torch = pytest.importorskip("torch")
    weights = tmp_path / f"{kind}.pth"
    _bad_weights(kind, weights, torch)
    code, err = _import(weights, tmp_path / "imported", capsys)
    assert code == 1
    assert err.startswith(f"extkd import-torch: error: --weights={weights}: ") and says in err
    assert (EXPECTED in err) == (kind != "missing")
    assert "weights_only" not in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "ran").exists() and not (tmp_path / "imported").exists()


# --------------------------------------------------------------------------------------------------- config values


@pytest.mark.parametrize(
    "key, value",
    [
        ("loss.temperature", math.nan),
        ("loss.temperature", math.inf),
        ("optim.learning_rate", math.nan),
        ("loss.kd_weight", math.nan),
        ("data.keep_fraction", math.nan),
        ("optim.momentum", -math.inf),
    ],
)
def test_non_finite_config_value_is_refused(key, value):
    """L1: NaN passes every comparison (`nan <= 0` is False): a NaN run started and then 'diverged'."""
    config = tiny_config(".", **{"loss.name": "kd", "teacher.workdir": "t", key: value})
    with pytest.raises(ConfigError, match=rf"^{key}={value!r}: expected a finite number"):
        check_config(config, "distill")


@pytest.mark.parametrize(
    "model, kwargs, key, bad",
    [
        ("mlp", {"hidden_sizes": (32, -4), "input_size": 64}, "hidden_sizes", "got -4"),
        ("mlp", {"hidden_sizes": (0,), "input_size": 64}, "hidden_sizes", "got 0"),
        ("mlp", {"hidden_sizes": (32, 2.5), "input_size": 64}, "hidden_sizes", "got 2.5"),
        ("mlp", {"hidden_sizes": (), "input_size": 64}, "hidden_sizes", "expected at least one size"),
        ("mlp", {"hidden_sizes": (32,), "input_size": 0}, "input_size", "got 0"),
        ("resnet8", {"in_channels": -1}, "in_channels", "got -1"),
    ],
)
def test_non_positive_model_size_is_refused(model, kwargs, key, bad):
    """L2: a width of -4 or 0 ended in an MLIRError or a ZeroDivisionError traceback."""
    config = tiny_config(".", **{"model.name": model})
    config.model.kwargs = kwargs
    with pytest.raises(ConfigError) as info:
        check_config(config, "train")
    assert str(info.value).startswith(f"model.kwargs.{key}=") and bad in str(info.value)


def test_absurd_loss_weight_is_refused():
    """L7: a segment weight of 1e30 overflowed the loss, and the run was told to lower the learning rate."""
    config = tiny_config(".", **{"loss.name": "extended_kd", "teacher.workdir": "t", "loss.extended_kd.weight": 1e30})
    with pytest.raises(ConfigError, match=r"loss.extended_kd.weight=1e\+30: expected a loss weight <= 1e\+12"):
        check_config(config, "distill")
    config.loss.extended_kd.weight = 1e12  # the largest accepted
    check_config(config, "distill")


@pytest.mark.slow
def test_divergence_names_a_huge_loss_weight(tmp_path):
    """L7: a loss weight of 1e11 (accepted) makes the loss non-finite; the error names that weight, not only the
    learning rate."""
    from extkd_jax.train.config_checks import divergence_hint
    from extkd_jax.train.loop import NonFiniteLossError, train_and_evaluate

    overrides = {"loss.name": "purf", "loss.purf.weight": 1e11, "num_epochs": 1}
    config = tiny_config(write_tiny_npz(tmp_path / "data"), **overrides)
    with pytest.raises(NonFiniteLossError, match=r"loss weights above 1e\+06 are the likely cause \(loss.purf.weight="):
        train_and_evaluate(config, tmp_path / "run", mode="train")
    assert divergence_hint(tiny_config(".")) == "lower optim.learning_rate (now 0.05)"


# --------------------------------------------------------------------------------------------------------- data


def test_class_without_training_examples_is_warned(tmp_path, caplog):
    """L3: a class missing from the training files (not dropped) trained silently as if it were dropped."""
    from extkd_jax.data.pipeline import plan_splits

    folder = write_tiny_npz(tmp_path / "data")
    for name in ("train_0.npz", "train_1.npz"):
        with np.load(folder / name) as f:
            x, y = f["x_train"], f["y_train"].copy()
        y[y == 7] = 6
        np.savez(folder / name, x_train=x, y_train=y)
    with caplog.at_level(logging.WARNING, logger="extkd_jax"):
        plan_splits(tiny_config(folder).data)
        plan_splits(tiny_config(folder).data)  # warned once
    warned = [r.getMessage() for r in caplog.records if "no training examples" in r.getMessage()]
    assert len(warned) == 1 and "class(es) [7]" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="extkd_jax"):
        plan_splits(tiny_config(folder, **{"data.drop_classes": (7,)}).data)  # dropped on purpose: no warning
    assert not [r for r in caplog.records if "no training examples" in r.getMessage()]
