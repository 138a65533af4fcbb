"""Bad inputs are refused with an error that names the value and what was expected, and leave existing workdirs
untouched. (Config values out of range are in tests/test_engine.py: BAD_VALUES, CLI_ERRORS.)"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from extkd_jax import cli, losses
from extkd_jax.experiment.reproduce import reproduce
from extkd_jax.models import create_model
from extkd_jax.train.config_checks import ConfigError
from extkd_jax.train.loop import train_and_evaluate
from tests.tiny import REPO_ROOT, tiny_config, write_tiny_npz

TINY_CONFIG = REPO_ROOT / "tests/scripts/tiny_config.py"


@pytest.fixture(scope="module")
def teacher_dir(data_dir, tmp_path_factory) -> pathlib.Path:
    """A finished `extkd train` run: mlp(64, 64), 1 epoch."""
    workdir = tmp_path_factory.mktemp("teacher") / "run"
    train_and_evaluate(
        tiny_config(data_dir, num_epochs=1, **{"model.kwargs.hidden_sizes": (64, 64)}), workdir, mode="train"
    )
    return workdir


def snapshot(folder: pathlib.Path) -> dict:
    """Every entry of a folder: directories, and files with size, mtime and content hash."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        if p.is_dir():
            out[key] = "dir"
        else:
            st = p.stat()
            out[key] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.fixture
def teacher(teacher_dir):
    """The finished teacher workdir; the test fails if anything in it changed."""
    before = snapshot(teacher_dir)
    yield teacher_dir
    assert snapshot(teacher_dir) == before, "the finished workdir was modified"


def refused(exc_type, fn, *fragments: str) -> str:
    """Calls fn, expects exc_type, and checks that the message holds every fragment; returns the message."""
    with pytest.raises(exc_type) as err:
        fn()
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in the error: {message}"
    return message


def no_results(workdir: pathlib.Path) -> None:
    """A refused run left no results: at most its config.json, its lock file and an empty checkpoints folder."""
    if workdir.exists():
        entries = {p.name for p in workdir.iterdir()}
        assert entries <= {"config.json", "checkpoints", ".lock"}, entries
        if (workdir / "checkpoints").exists():
            assert not any((workdir / "checkpoints").iterdir())


# --------------------------------------------------------------------------------------------------------- data


def _copy_data(data_dir: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    folder = tmp_path / "data" / "mnist"
    shutil.copytree(data_dir, folder)
    return folder


def _rewrite(folder: pathlib.Path, file: str, **arrays) -> None:
    """Rewrites one npz file of the folder, replacing some of its arrays (an array None is left out)."""
    with np.load(folder / file) as npz:
        content = {k: npz[k] for k in npz.files}
    content.update(arrays)
    np.savez(folder / file, **{k: v for k, v in content.items() if v is not None})


def _train_x(folder, file="train_0.npz"):
    with np.load(folder / file) as npz:
        return npz["x_train"], npz["y_train"]


def _images_rank2(f):
    x, _ = _train_x(f)
    _rewrite(f, "train_0.npz", x_train=x.reshape(len(x), -1))


def _images_rank5(f):
    x, _ = _train_x(f)
    _rewrite(f, "train_0.npz", x_train=x[..., None, None])


def _float_images(f):
    x, _ = _train_x(f)
    _rewrite(f, "train_0.npz", x_train=x.astype(np.float32) / 255)


def _label_out_of_range(f):
    _, y = _train_x(f, "train_1.npz")
    y = y.copy()
    y[5] = 12
    _rewrite(f, "train_1.npz", y_train=y)


def _negative_label(f):
    _, y = _train_x(f)
    y = y.astype(np.int16)
    y[0] = -1
    _rewrite(f, "train_0.npz", y_train=y)


def _float_labels(f):
    _, y = _train_x(f)
    _rewrite(f, "train_0.npz", y_train=y.astype(np.float64))


def _fewer_labels(f):
    _, y = _train_x(f)
    _rewrite(f, "train_0.npz", y_train=y[:-1])


def _other_key_names(f):
    x, y = _train_x(f)
    np.savez(f / "train_0.npz", images=x, labels=y)


def _test_images_of_another_size(f):
    np.savez(f / "test.npz", x_test=np.zeros((10, 9, 9), np.uint8), y_test=np.arange(10, dtype=np.uint8))


BAD_DATA = [
    # (mutation, error type, fragments of the message)
    (_images_rank2, ValueError, ["train_0.npz", "images shape (200, 64)", "expected (N, H, W) or (N, H, W, C)"]),
    (_images_rank5, ValueError, ["train_0.npz", "images shape (200, 8, 8, 1, 1)", "expected (N, H, W)"]),
    (_float_images, ValueError, ["train_0.npz", "images dtype float32, expected uint8"]),
    (_label_out_of_range, ValueError, ["train_1.npz", "label 12 out of range [0, 10)"]),
    (_negative_label, ValueError, ["train_0.npz", "labels range [-1, 9]", "expected class ids in [0,"]),
    (_float_labels, ValueError, ["train_0.npz", "labels dtype float64, expected an integer dtype"]),
    (_fewer_labels, ValueError, ["train_0.npz", "200 images but 199 labels", "expected the same number"]),
    (_other_key_names, ValueError, ["train_0.npz has no array 'x_train'", "'images'", "'labels'"]),
    (_test_images_of_another_size, ValueError, ["train images (8, 8, 1) but test images (9, 9, 1)"]),
]


@pytest.mark.parametrize("mutate,exc_type,fragments", BAD_DATA, ids=[b[0].__name__[1:] for b in BAD_DATA])
def test_bad_npz_files_are_refused_before_any_workdir_is_made(mutate, exc_type, fragments, data_dir, tmp_path):
    folder = _copy_data(data_dir, tmp_path)
    mutate(folder)
    refused(exc_type, lambda: train_and_evaluate(tiny_config(folder), tmp_path / "run", mode="train"), *fragments)
    assert not (tmp_path / "run").exists()


def test_empty_transfer_set(tmp_path):
    """Every class present in the training split is dropped (the data holds only classes 0 and 1)."""
    folder = write_tiny_npz(tmp_path / "data" / "mnist", num_classes=2)
    config = tiny_config(folder, **{"data.drop_classes": (0, 1)})
    refused(
        ValueError,
        lambda: train_and_evaluate(config, tmp_path / "run", mode="train"),
        "transfer set is empty",
        "dropping classes (0, 1)",
        "from 350 training examples",
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "overrides,exc_type,fragments",
    [
        (
            {"data.dir": "/nonexistent/extkd-data"},
            FileNotFoundError,
            ["/nonexistent/extkd-data/mnist", "expected a folder with train_0.npz"],
        ),
        ({"data.val_size": 400}, ValueError, ["val_size 400 must be smaller", "(400 examples)"]),
        ({"data.drop_classes": (10,)}, ValueError, ["class 10 to drop is out of range [0, num_classes=10)"]),
        ({"data.drop_classes": (3, 3)}, ConfigError, ["data.drop_classes=(3, 3)", "expected distinct classes"]),
        ({"data.drop_classes": (3.5,)}, ConfigError, ["data.drop_classes entry=3.5", "expected a whole number"]),
    ],
    ids=[
        "missing_data_folder",
        "val_size_not_below_train_size",
        "drop_class_too_large",
        "duplicate_drop_classes",
        "fractional_drop_class",
    ],
)
def test_bad_data_config(overrides, exc_type, fragments, data_dir, tmp_path):
    config = tiny_config(data_dir, **overrides)
    refused(exc_type, lambda: train_and_evaluate(config, tmp_path / "run", mode="train"), *fragments)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ models, losses


def test_unknown_model_name_lists_the_known_ones():
    message = refused(
        ValueError, lambda: create_model("ResNet20", 10, rngs=nnx.Rngs(0)), "unknown model 'ResNet20'", "known models:"
    )
    assert "resnet20" in message and "mlp" in message


def test_unknown_model_keyword_is_named(data_dir, tmp_path):
    config = tiny_config(data_dir, **{"model.kwargs.hidden": (16,)})
    refused(
        ValueError,
        lambda: train_and_evaluate(config, tmp_path / "run", mode="train"),
        "model 'mlp' does not accept",
        "'hidden'",
        "model.kwargs",
    )
    no_results(tmp_path / "run")


def test_mlp_input_size_that_does_not_match_the_images(data_dir, tmp_path):
    config = tiny_config(data_dir, **{"model.kwargs.input_size": 100})
    refused(
        ValueError,
        lambda: train_and_evaluate(config, tmp_path / "run", mode="train"),
        "input_size=100",
        "flattens to 64 features",
        "8, 8, 1)",
        "input_size=64",
    )
    no_results(tmp_path / "run")


def test_loss_functions_refuse_bad_scalars():
    s, t = jnp.zeros((4, 3)), jnp.ones((4, 3))
    refused(ValueError, lambda: losses.kd_kl(s, t, temperature=jnp.float32(0.0)), "kd_kl", "temperature", "must be > 0")
    refused(ValueError, lambda: losses.kd_kl(s, t, temperature=-2.0), "temperature must be > 0, got -2.0")
    labels = jnp.zeros(4, jnp.int32)
    refused(
        ValueError,
        lambda: losses.extended_kd_loss(s, t, labels, None, None, kd_weight=np.float32(-1.0)),
        "extended_kd_loss",
        "kd_weight must be >= 0",
        "-1.0",
    )
    refused(
        ValueError,
        lambda: losses.extended_kd_loss(s, t, labels, [s], [t], segment_weight=-0.5),
        "segment_weight must be >= 0, got -0.5",
    )


# ----------------------------------------------------------------------------------------------------- teachers


def _distill(data_dir, teacher_dir, **overrides):
    return tiny_config(
        data_dir, num_epochs=1, **{"loss.name": "extended_kd", "teacher.workdir": str(teacher_dir), **overrides}
    )


@pytest.mark.parametrize(
    "overrides,fragments",
    [
        (
            {"model.kwargs.hidden_sizes": (32, 32, 32)},
            ["loss.name='extended_kd'", "the student has 3 segments and the teacher 2", "no mapping was given"],
        ),
        ({"loss.segments": (5,)}, ["loss.segments holds 5", "the student has segments 0..1"]),
        (
            {"loss.segments": (0,), "loss.teacher_segments": (-3,)},
            ["loss.teacher_segments holds -3", "the teacher has segments 0..1"],
        ),
        (
            {"loss.segments": (0, 1), "loss.teacher_segments": (1,)},
            ["loss.segments=(0, 1) and loss.teacher_segments=(1,) differ in length"],
        ),
    ],
    ids=[
        "segment_counts_differ",
        "student_segment_out_of_range",
        "teacher_segment_out_of_range",
        "segment_lists_of_different_lengths",
    ],
)
def test_segments_that_do_not_pair(overrides, fragments, data_dir, teacher, tmp_path):
    config = _distill(data_dir, teacher, **overrides)
    refused(ValueError, lambda: train_and_evaluate(config, tmp_path / "run", mode="distill"), *fragments)
    no_results(tmp_path / "run")


def test_teacher_name_that_is_not_the_checkpoint(data_dir, teacher, tmp_path):
    config = _distill(data_dir, teacher, **{"loss.name": "kd", "teacher.name": "wrn_16_2"})
    refused(
        ValueError,
        lambda: train_and_evaluate(config, tmp_path / "run", mode="distill"),
        f"the checkpoint in {teacher} is a 'mlp'",
        "expected 'wrn_16_2'",
    )


def test_teacher_card_edited_to_another_shape(data_dir, teacher, tmp_path):
    """The teacher's checkpoints carry a card saying mlp(64, 48) but arrays of mlp(64, 64): refused, named. (The
    cards' digests are rewritten to match, as a writer of wrong cards would: an edit alone fails the digest.)"""
    from extkd_jax.train.checkpoint import json_digest

    edited = tmp_path / "edited_teacher"
    shutil.copytree(teacher, edited)
    for card in edited.glob("checkpoints/*/card/metadata"):
        record = json.loads(card.read_text())
        record["model"]["kwargs"]["hidden_sizes"] = [64, 48]
        card.write_text(json.dumps(record))
        digest = card.parent.parent / "digest" / "metadata"
        digest.write_text(json.dumps({**json.loads(digest.read_text()), "card": json_digest(record)}))
    before = snapshot(edited)
    config = _distill(data_dir, edited, **{"loss.name": "kd"})
    with pytest.warns(UserWarning, match="could not be restored"):
        message = refused(
            ValueError,
            lambda: train_and_evaluate(config, tmp_path / "run", mode="distill"),
            "do not fit the architecture its card describes",
            "'mlp'",
            "[64, 48]",
        )
    # found from the stored metadata before Orbax reads an array (its own check fails amid concurrent reads)
    assert "(48,) of params.hidden.1.bias is not compatible with the stored shape (64,)" in message, message
    assert snapshot(edited) == before
    no_results(tmp_path / "run")


def test_teacher_workdir_that_does_not_exist(data_dir, tmp_path):
    config = _distill(data_dir, tmp_path / "no_teacher_here")
    refused(
        FileNotFoundError,
        lambda: train_and_evaluate(config, tmp_path / "run", mode="distill"),
        f"workdir {tmp_path / 'no_teacher_here'} does not exist",
    )
    no_results(tmp_path / "run")


def test_teacher_workdir_without_checkpoint(data_dir, teacher, tmp_path):
    unfinished = tmp_path / "unfinished_teacher"
    unfinished.mkdir()
    shutil.copy(teacher / "config.json", unfinished / "config.json")
    config = _distill(data_dir, unfinished)
    refused(
        FileNotFoundError,
        lambda: train_and_evaluate(config, tmp_path / "run", mode="distill"),
        f"no readable checkpoint under {unfinished / 'checkpoints'}",
    )
    assert sorted(p.name for p in unfinished.iterdir()) == ["config.json"]  # nothing created there


def test_teacher_of_another_number_of_classes(teacher, tmp_path):
    folder = write_tiny_npz(tmp_path / "data" / "toy", num_classes=5)
    config = _distill(folder, teacher, **{"data.name": "toy", "loss.name": "kd"})
    refused(
        ValueError,
        lambda: train_and_evaluate(config, tmp_path / "run", mode="distill"),
        "10 classes",
        "5 classes",
        str(teacher),
    )


def test_teacher_of_another_input_shape(teacher, tmp_path):
    folder = write_tiny_npz(tmp_path / "data" / "mnist", size=10)
    config = _distill(folder, teacher, **{"loss.name": "kd", "model.kwargs.input_size": 100})
    refused(
        ValueError,
        lambda: train_and_evaluate(config, tmp_path / "run", mode="distill"),
        "8, 8, 1",
        "10, 10, 1",
        str(teacher),
    )


def test_teacher_workdir_that_is_a_file(data_dir, teacher, tmp_path):
    config = _distill(data_dir, teacher / "config.json")
    refused(
        (FileNotFoundError, ValueError),
        lambda: train_and_evaluate(config, tmp_path / "run", mode="distill"),
        "is a file, not a directory",
    )


# ----------------------------------------------------------------------------------------------------- workdirs


def test_workdir_of_another_kind_is_refused_and_untouched(data_dir, teacher):
    """A `train` workdir given to `distill` (whatever the config)."""
    config = _distill(data_dir, teacher, **{"model.kwargs.hidden_sizes": (64, 64)})
    refused(
        ValueError,
        lambda: train_and_evaluate(config, teacher, mode="distill"),
        f"workdir {teacher} holds a `train` run; this is a `distill` run",
        "Use another --workdir",
    )


def test_workdir_that_is_a_file(data_dir, teacher):
    refused(
        ValueError,
        lambda: train_and_evaluate(tiny_config(data_dir), teacher / "metrics.jsonl", mode="train"),
        "metrics.jsonl is a file; expected a directory",
    )


def test_batch_larger_than_the_transfer_set_then_the_corrected_rerun(data_dir, tmp_path):
    config = tiny_config(data_dir, batch_size=320, num_epochs=1, **{"data.drop_classes": (1,)})
    refused(
        ValueError,
        lambda: train_and_evaluate(config, tmp_path / "run", mode="train"),
        "batch_size=320 exceeds the 318 training examples",
    )
    no_results(tmp_path / "run")
    # the refused start does not lock the workdir: the corrected command runs there
    record = train_and_evaluate(
        tiny_config(data_dir, batch_size=53, num_epochs=1, **{"data.drop_classes": (1,)}),
        tmp_path / "run",
        mode="train",
    )
    assert record["epoch"] == 1 and record["step"] == 6


def test_batch_not_divisible_by_the_device_count(data_dir, tmp_path):
    code = (
        "import sys, jax\n"
        f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
        "from tests.tiny import tiny_config\n"
        "from extkd_jax.train.loop import train_and_evaluate\n"
        "assert jax.device_count() == 8, jax.devices()\n"
        "try:\n"
        f"    train_and_evaluate(tiny_config({str(data_dir)!r}, batch_size=20), {str(tmp_path / 'run')!r}, "
        "mode='train')\n"
        "except ValueError as err:\n"
        "    print('REFUSED:', err)\n"
    )
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT)
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False, cwd=REPO_ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REFUSED: batch_size=20 is not divisible by the 8 devices of the mesh; use a multiple of 8" in out.stdout
    no_results(tmp_path / "run")


# ---------------------------------------------------------------------------------------------------- reproduce


def _reproduce_config(data_dir, **overrides):
    config = tiny_config(data_dir, **{"teacher.name": "mlp", "data.drop_classes": (3,), **overrides})
    return config


@pytest.mark.parametrize(
    "overrides,fragments",
    [
        ({"data.drop_classes": ()}, ["data.drop_classes is empty", "at least one class to drop"]),
        (
            {"reproduce.methods": ("kd", "hinton_kd")},
            ["reproduce.methods holds 'hinton_kd'", "expected names from", "'extended_kd'"],
        ),
    ],
    ids=["no_class_dropped", "unknown_method"],
)
def test_bad_reproduce_config_is_refused_before_any_run(overrides, fragments, data_dir, tmp_path):
    config = _reproduce_config(data_dir, **overrides)
    refused(ValueError, lambda: reproduce(config, tmp_path / "experiment"), *fragments)
    assert not (tmp_path / "experiment").exists()


# ---------------------------------------------------------------------------------------------------------- CLI


def _cli(args, capsys) -> tuple[int, str]:
    status = cli.main([str(a) for a in args])
    return status, capsys.readouterr().err


def test_cli_evaluate_on_a_folder_that_is_not_a_workdir(data_dir, capsys):
    before = snapshot(data_dir)
    status, err = _cli(["evaluate", f"--workdir={data_dir}"], capsys)
    assert status == 1
    assert f"{data_dir / 'config.json'} not found: {data_dir} is not the workdir of an `extkd` run" in err
    assert snapshot(data_dir) == before


def test_cli_evaluate_on_a_missing_folder(tmp_path, capsys):
    status, err = _cli(["evaluate", f"--workdir={tmp_path / 'nothing'}"], capsys)
    assert status == 1
    assert f"workdir {tmp_path / 'nothing'} does not exist" in err
    assert not (tmp_path / "nothing").exists()


def test_cli_config_path_in_a_missing_folder(tmp_path, capsys):
    status, err = _cli(["train", f"--config={tmp_path}/no/such/dir/preset.py", f"--workdir={tmp_path / 'w'}"], capsys)
    assert status == 2
    assert f"--config={tmp_path}/no/such/dir/preset.py: no such config file" in err
    assert "mnist_teacher" in err  # the presets are listed


def test_cli_config_file_without_get_config(tmp_path, capsys):
    # a valid config file first: ml_collections loads both as one module name, which must not leak get_config()
    assert _cli(["config", f"--config={REPO_ROOT / 'configs/smoke.py'}"], capsys)[0] == 0
    path = tmp_path / "not_a_config.py"
    path.write_text("x = 1\n")
    status, err = _cli(["train", f"--config={path}", f"--workdir={tmp_path / 'w'}"], capsys)
    assert status == 2
    assert "get_config" in err and "unknown config key" not in err


def test_cli_config_file_with_a_syntax_error(tmp_path, capsys):
    path = tmp_path / "broken.py"
    path.write_text("def get_config(:\n")
    status, err = _cli(["train", f"--config={path}", f"--workdir={tmp_path / 'w'}"], capsys)
    assert status == 2
    assert str(path) in err


@pytest.mark.parametrize(
    "config,expected",
    [
        (
            REPO_ROOT / "configs/cifar10_drop.py",
            "unknown config variant 'gpu'; expected sizes ['conv', 'cpu', 'mini', 'short', 'two', 'zoo']",
        ),
        (TINY_CONFIG, "get_config() takes 0 positional arguments but 1 was given"),
    ],
    ids=["preset_with_other_sizes", "preset_without_variants"],
)
def test_cli_variant_the_preset_does_not_have(config, expected, tmp_path, capsys):
    status, err = _cli(["train", f"--config={config}:gpu", f"--workdir={tmp_path / 'w'}"], capsys)
    assert status == 2
    assert expected in err
    assert not (tmp_path / "w").exists()


def test_cli_misspelt_top_level_key_suggests_the_right_one(tmp_path, capsys):
    status, err = _cli(["train", f"--config={TINY_CONFIG}", "--config.epochs=3", f"--workdir={tmp_path / 'w'}"], capsys)
    assert status == 2
    assert "unknown config key" in err and "'epochs'" in err and 'Did you mean "num_epochs"' in err


def test_cli_unknown_loss_name_exits_1_before_touching_the_workdir(data_dir, teacher, capsys):
    status, err = _cli(
        [
            "distill",
            f"--config={TINY_CONFIG}",
            f"--config.data.dir={data_dir}",
            "--config.loss.name=hinton",
            f"--config.teacher.workdir={teacher}",
            f"--workdir={teacher}",
        ],
        capsys,
    )
    assert status == 1
    assert "extkd distill: error: loss.name='hinton': expected one of" in err and "'extended_kd'" in err
