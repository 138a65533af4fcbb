"""The training engine: device-count invariance, dispatch chunking, label dropping, resume, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from extkd_jax.data import prepare_datasets
from extkd_jax.train import sharding
from extkd_jax.train.checkpoint import Checkpointer
from extkd_jax.train.config_checks import ConfigError, check_config
from extkd_jax.train.epoch import epoch_permutation, make_run_steps
from extkd_jax.train.loop import NonFiniteLossError, train_and_evaluate
from extkd_jax.train.metrics import read_metrics
from tests.tiny import REPO_ROOT, random_teacher, tiny_config, tiny_setup


def _one_device_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()[:1]), (sharding.DATA_AXIS,))


def _run_epoch(config, chunks: list[int], data):
    """Runs one epoch of `sum(chunks)` steps split into dispatches of the given sizes."""
    mesh = _one_device_mesh()
    images, labels = data
    program = tiny_setup(config, images.shape[1:], sum(chunks), mean=100.0, std=70.0)
    run_steps = make_run_steps(program.step_fn, mesh, config.batch_size, "mnist")
    key = jax.random.key(11)
    perm = epoch_permutation(key, len(images))
    state = sharding.put_replicated(program.init_state(), mesh)
    losses, start = [], 0
    for n in chunks:
        state, metrics = run_steps(state, None, images, labels, perm, key, jnp.int32(start), num_steps=n)
        losses.extend(np.asarray(metrics["loss"]).tolist())
        start += n
    return sharding.to_host(state), np.asarray(losses)


@pytest.mark.accelerator
def test_one_program_per_epoch_equals_one_dispatch_per_step(data_dir):
    config = tiny_config(data_dir)
    ds = prepare_datasets(config.data)
    data = (ds.transfer.images, ds.transfer.labels)
    whole_state, whole_losses = _run_epoch(config, [6], data)
    step_state, step_losses = _run_epoch(config, [1] * 6, data)
    mixed_state, _ = _run_epoch(config, [4, 2], data)
    np.testing.assert_allclose(whole_losses, step_losses, rtol=1e-6)
    for a, b, c in zip(
        jax.tree.leaves(whole_state.params), jax.tree.leaves(step_state.params), jax.tree.leaves(mixed_state.params)
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-7)
    assert int(whole_state.step) == 6
    # the updates did something: parameters moved away from their initial values
    init = tiny_setup(config, data[0].shape[1:], 6).variables["params"]
    assert (
        max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(whole_state.params), jax.tree.leaves(init)))
        > 1e-3
    )


def test_no_dropped_label_ever_reaches_a_training_batch(data_dir):
    config = tiny_config(data_dir, **{"data.drop_classes": (3, 7), "batch_size": 20})
    ds = prepare_datasets(config.data)
    assert np.isin([3, 7], ds.test.labels).all() and np.isin([3, 7], ds.val.labels).all()
    mesh = _one_device_mesh()

    def recording_step(state, teacher_vars, x, y, key, indices=None):
        return state, {"labels": y}

    run_steps = make_run_steps(recording_step, mesh, 20, "mnist")
    steps = len(ds.transfer) // 20
    seen = []
    for epoch in range(3):
        key = jax.random.fold_in(jax.random.key(0), epoch)
        _, out = run_steps(
            jnp.zeros(()),
            None,
            ds.transfer.images,
            ds.transfer.labels,
            epoch_permutation(key, len(ds.transfer)),
            key,
            jnp.int32(0),
            num_steps=steps,
        )
        seen.append(np.asarray(out["labels"]).ravel())
    seen = np.concatenate(seen)
    assert len(seen) == 3 * steps * 20
    assert not np.isin(seen, [3, 7]).any()
    assert set(np.unique(seen)) == set(range(10)) - {3, 7}


def _on_eight_cpu_devices(script: str, *args: str) -> dict:
    """Runs tests/scripts/SCRIPT with 8 host CPU devices; its last stdout line, parsed as JSON."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests/scripts" / script), str(REPO_ROOT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_eight_devices_match_one_device():
    result = _on_eight_cpu_devices("steps_on_meshes.py", "fold")
    assert result["devices"] == 8
    assert result["loss_diff"] <= 1e-5
    assert result["param_diff"] <= 1e-5
    assert result["stats_diff"] <= 1e-5
    assert result["loss_all"][0] != result["loss_all"][-1]


def _extkd(*args):
    return [sys.executable, "-m", "extkd_jax.cli", *args]


def _run_extkd(*args) -> subprocess.CompletedProcess:
    """`extkd ARGS` in a fresh process on the CPU, from the checkout; output captured."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(_extkd(*args), env=env, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)


def _config_flags(config_path, data_dir, extra=()):
    return [f"--config={config_path}", f"--config.data.dir={data_dir}", *extra]


@pytest.mark.slow
@pytest.mark.fault
def test_sigkill_mid_run_resumes_to_the_same_result(data_dir, tmp_path):
    flags = _config_flags(
        REPO_ROOT / "tests/scripts/tiny_config.py",
        data_dir,
        ["--config.num_epochs=20", "--config.steps_per_dispatch=1"],
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    full = _run_extkd("train", *flags, f"--workdir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        _extkd("train", *flags, f"--workdir={killed_dir}"),
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    rng = np.random.default_rng()
    # kill at a random moment after the first checkpoint (epoch 1) and well before the run ends
    while time.time() < deadline and len(read_metrics(killed_dir)) < 1 and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.1))
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before_restart = len(read_metrics(killed_dir))
    resumed = _run_extkd("train", *flags, f"--workdir={killed_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = read_metrics(tmp_path / "full"), read_metrics(killed_dir)
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == list(range(1, 21))
    timing = ("epoch_time_s", "img_per_s", "wall_time_s")
    for ra, rb in zip(a, b):
        for k in ra:
            if k not in timing:
                np.testing.assert_allclose(
                    np.asarray(ra[k], float),
                    np.asarray(rb[k], float),
                    rtol=1e-6,
                    atol=1e-7,
                    err_msg=f"{k} at epoch {ra['epoch']}",
                )
    assert done_before_restart < 20, "the kill came after the run finished: the test proved nothing"
    from extkd_jax.train.evaluate import restore_model

    pa, pb = restore_model(tmp_path / "full")[1], restore_model(killed_dir)[1]
    for x, y in zip(jax.tree.leaves(pa["params"]), jax.tree.leaves(pb["params"])):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_cli_train_distill_evaluate(data_dir, tmp_path):
    base = _config_flags(
        REPO_ROOT / "tests/scripts/tiny_config.py",
        data_dir,
        ["--config.optim.learning_rate=0.3", "--config.num_epochs=6", "--config.batch_size=25"],
    )
    teacher = _run_extkd("train", *base, "--config.model.kwargs.hidden_sizes=(64,64)", f"--workdir={tmp_path / 't'}")
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    student = _run_extkd(
        "distill",
        *base,
        "--config.loss.name=extended_kd",
        f"--config.teacher.workdir={tmp_path / 't'}",
        "--config.teacher.name=mlp",
        "--config.data.drop_classes=(3,)",
        f"--workdir={tmp_path / 's'}",
    )
    assert student.returncode == 0, student.stderr[-3000:]
    records = read_metrics(tmp_path / "s")
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5, 6]
    for key in (
        "train_ce",
        "train_kd",
        "train_segment",
        "learning_rate",
        "val_acc",
        "test_acc",
        "test_seen_acc",
        "test_unseen_acc",
        "test_per_class_acc",
        "img_per_s",
    ):
        assert key in records[-1], key
    assert records[-1]["train_loss"] < 0.8 * records[0]["train_loss"]  # it learned
    assert records[-1]["test_acc"] > 0.2  # 10 classes: chance is 0.1
    evaluation = _run_extkd("evaluate", f"--workdir={tmp_path / 's'}")
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    stored = json.loads((tmp_path / "s" / "eval.json").read_text())
    assert stored["test_acc"] == pytest.approx(records[-1]["test_acc"], abs=1e-9)
    # a teacher of another architecture is refused with a clear message
    wrong = _run_extkd(
        "distill",
        *base,
        "--config.loss.name=kd",
        f"--config.teacher.workdir={tmp_path / 't'}",
        "--config.teacher.name=resnet20",
        f"--workdir={tmp_path / 'w'}",
    )
    assert wrong.returncode == 1
    assert "'mlp'" in wrong.stderr and "resnet20" in wrong.stderr


def test_nonfinite_loss_stops_with_the_step_named(data_dir, tmp_path):
    config = tiny_config(data_dir, **{"optim.learning_rate": 1e6, "num_epochs": 4, "model.kwargs.dropout": 0.0})
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step \d+: .*ce"):
        train_and_evaluate(config, tmp_path / "nan", mode="train")
    # skipping: the first steps are finite and throw the weights far; the later ones are skipped
    skipped = tiny_config(
        data_dir, **{"optim.learning_rate": 1e6, "num_epochs": 1, "on_nonfinite": "skip", "model.kwargs.dropout": 0.0}
    )
    record = train_and_evaluate(skipped, tmp_path / "skip", mode="train")
    steps = record["step"]
    assert 0 < record["train_skipped_steps"] < steps
    assert np.isfinite(record["test_acc"])
    # an epoch in which every step is skipped is a failure, not a result
    skipped.num_epochs = 2
    with pytest.raises(NonFiniteLossError, match=f"skipped every one of the {steps} steps of epoch 2"):
        train_and_evaluate(skipped, tmp_path / "skip_2", mode="train")


BAD_VALUES = [
    ("loss.temperature", 0.0, "loss.temperature=0.0"),
    ("loss.temperature", -1.0, "expected a value > 0"),
    ("loss.kd_weight", -0.5, "loss.kd_weight=-0.5"),
    ("loss.extended_kd.weight", -1.0, "loss.extended_kd.weight"),
    ("loss.name", "hinton", "loss.name='hinton'"),
    ("model.name", "resnet9000", "resnet9000"),
    ("optim.learning_rate", 0.0, "optim.learning_rate"),
    ("optim.momentum", 1.5, "optim.momentum=1.5"),
    ("optim.schedule", "linear", "optim.schedule='linear'"),
    ("batch_size", 0, "batch_size=0"),
    ("num_epochs", 0, "num_epochs=0"),
    ("compute_dtype", "float16", "compute_dtype='float16'"),
    ("data.source", "web", "data.source='web'"),
    ("data.augment", "mixup", "data.augment='mixup'"),
    ("data.val_size", -1, "data.val_size=-1"),
    ("data.keep_fraction", 1.0, "data.keep_fraction=1.0"),
    ("on_nonfinite", "ignore", "on_nonfinite='ignore'"),
    ("keep_checkpoints", 0, "keep_checkpoints=0"),
]


@pytest.mark.parametrize("key,value,message", BAD_VALUES, ids=[b[0] + "=" + str(b[1]) for b in BAD_VALUES])
def test_bad_config_values_are_named(key, value, message, tmp_path):
    config = tiny_config(tmp_path, **{key: value})
    with pytest.raises(ConfigError) as err:
        check_config(config, "train")
    assert message in str(err.value)


def test_mode_specific_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="needs a teacher"):
        check_config(tiny_config(tmp_path, **{"loss.name": "kd"}), "train")
    with pytest.raises(ConfigError, match="teacher.workdir is empty"):
        check_config(tiny_config(tmp_path, **{"loss.name": "kd"}), "distill")
    with pytest.raises(ConfigError, match="uses no teacher"):
        check_config(tiny_config(tmp_path, **{"teacher.workdir": "x"}), "distill")


def test_workdir_of_another_experiment_is_refused_and_untouched(data_dir, tmp_path):
    config = tiny_config(data_dir, num_epochs=1)
    train_and_evaluate(config, tmp_path / "w", mode="train")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "w").rglob("*"))
    other = tiny_config(data_dir, num_epochs=1, **{"optim.learning_rate": 0.2})
    with pytest.raises(ValueError, match="holds a different experiment.*optim.learning_rate"):
        train_and_evaluate(other, tmp_path / "w", mode="train")
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "w").rglob("*")) == before


CLI_ERRORS = [
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["train", "--workdir=/tmp/x"], "needs --config"),
    (["train", "--config=no_such_preset"], "no such config file"),
    (
        ["train", "--config=configs/digits_omit3.py:teacher", "--config.loss.nonsense=3", "--workdir=/tmp/x"],
        "unknown config key",
    ),
    (["train", "--config=digits_omit3:teacher", "--config.loss.temperature=hot", "--workdir=/tmp/x"], "hot"),
    (["train", "--config=digits_omit3:teacher"], "needs --workdir"),
    (["train", "--config=digits_omit3", "--workdir=/tmp/x"], "digits_omit3:teacher"),
    (["reproduce", "--config=mnist_teacher", "--workdir=/tmp/x"], "use `extkd train` or `extkd distill`"),
]


@pytest.mark.parametrize("args,message", CLI_ERRORS, ids=[" ".join(a[:2]) for a, _ in CLI_ERRORS])
def test_cli_usage_errors(args, message, capsys):
    from extkd_jax import cli

    assert cli.main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_sharded_placement_each_device_draws_from_its_own_slice(tmp_path):
    result = _on_eight_cpu_devices("sharded_epoch.py", str(tmp_path))
    assert result["devices"] == 8
    assert result["steps"] == (203 // 8) // (16 // 8)  # 12 steps of 2 examples per device
    used = result["used"]
    assert len(used) == len(set(used)) == 12 * 16  # no example twice in an epoch
    assert max(used) < 200  # the 3 examples past 8 * 25 are left out
    assert result["origin_ok"], "a device read an example outside its own shard"
    assert result["labels_match"]
    assert result["epochs"] == 10 and result["test_acc"] > 0.3  # 10 classes: chance is 0.1


@pytest.mark.accelerator
@pytest.mark.parametrize("loss", ["at", "fitnet", "dkd"])
def test_feature_and_logit_losses_train_through_the_engine(loss):
    """AT (raw segments), FitNet (one connector) and DKD run through the real step and lower their loss."""

    config = tiny_config(
        ".",
        **{
            "model.name": "resnet8",
            "loss.name": loss,
            "batch_size": 16,
            **({f"loss.{loss}.weight": 10.0} if loss != "dkd" else {}),  # AT's beta, FitNet's hint weight
            "optim.learning_rate": 0.05,
        },
    )
    config.model.kwargs = {}
    teacher = random_teacher("resnet14", dtype=jnp.float32)
    program = tiny_setup(config, (8, 8, 3), 4, teacher)
    assert len(program.pairs) == (1 if loss == "fitnet" else 3 if loss == "at" else 0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(16, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(16,)).astype(np.int32)
    mesh = _one_device_mesh()
    run_steps = make_run_steps(program.step_fn, mesh, 16, "none")
    key = jax.random.key(0)
    state = sharding.put_replicated(program.init_state(), mesh)
    teacher_vars = sharding.put_replicated(program.teacher_variables, mesh)
    state, metrics = run_steps(state, teacher_vars, images, labels, jnp.arange(16), key, jnp.int32(0), num_steps=8)
    losses = np.asarray(metrics["loss"])
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    part = {"at": "at", "fitnet": "segment", "dkd": "dkd"}[loss]
    assert np.all(np.asarray(metrics[part]) > 0)


class UserNet(nnx.Module):
    """A model written by a user: plain NNX layers, its segments sown with the public API in every call."""

    segment_names = ("features", "hidden")

    def __init__(self, num_classes: int, *, rngs: nnx.Rngs, dtype=jnp.float32, input_size: int = 64):
        def dense(i, o):
            return nnx.Linear(i, o, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

        self.fc1, self.fc2, self.out = dense(input_size, 24), dense(24, 24), dense(24, num_classes)

    def __call__(self, x):
        h1 = nnx.relu(self.fc1(x.reshape(x.shape[0], -1)))
        self.sow(nnx.Intermediate, "features", h1)
        h2 = nnx.relu(self.fc2(h1))
        self.sow(nnx.Intermediate, "hidden", h2)
        return self.out(h2)


def test_a_users_model_distils_through_the_engine(data_dir, tmp_path):
    """register_model + public sow: the user's model is a student (extended_kd, both segments) and a teacher."""
    from extkd_jax.models import register_model

    register_model("user_net", lambda n, *, rngs, dtype=jnp.float32, **kw: UserNet(n, rngs=rngs, dtype=dtype, **kw))
    teacher = tiny_config(data_dir, **{"model.name": "user_net", "num_epochs": 4})
    teacher.model.kwargs = {"input_size": 64}
    train_and_evaluate(teacher, tmp_path / "teacher", mode="train")
    student = tiny_config(
        data_dir,
        **{
            "loss.name": "extended_kd",
            "teacher.workdir": str(tmp_path / "teacher"),
            "model.kwargs.hidden_sizes": (16, 16),
            "num_epochs": 4,
        },
    )
    record = train_and_evaluate(student, tmp_path / "student", mode="distill")
    records = read_metrics(tmp_path / "student")
    assert records[0]["train_segment"] > 0 and records[-1]["train_loss"] < records[0]["train_loss"]
    assert record["epoch"] == 4
    # and the other way round: the user's model learns from an MLP teacher through both its segments
    back = tiny_config(
        data_dir,
        **{
            "model.name": "user_net",
            "loss.name": "extended_kd",
            "num_epochs": 2,
            "teacher.workdir": str(tmp_path / "student"),
        },
    )
    back.model.kwargs = {"input_size": 64}
    train_and_evaluate(back, tmp_path / "back", mode="distill")
    assert read_metrics(tmp_path / "back")[0]["train_segment"] > 0


def test_a_fresh_listing_sees_another_writers_steps_without_orbaxs_deprecation(tmp_path, caplog):
    """`all_steps(read=True)` (what a loader uses while a trainer writes) lists a step saved by another
    Checkpointer after this one was opened, through orbax's `reload`: no "`read` option is deprecated" line in every
    run's log."""
    reader = Checkpointer(tmp_path)
    Checkpointer(tmp_path).save(5, {"state": {"w": np.arange(3.0)}})
    assert reader.all_steps() == []  # the cached listing predates the save
    with caplog.at_level("WARNING"):
        assert reader.all_steps(read=True) == [5]
    assert "deprecated" not in caplog.text
