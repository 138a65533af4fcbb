"""Shared test set-up: a persistent XLA compilation cache so repeated programs compile once; the tiny data set and
a finished run that several test files use."""

import os
import pathlib
import shutil

import pytest

_CACHE = pathlib.Path(
    os.environ.get("EXTKD_TEST_JAX_CACHE", pathlib.Path(__file__).resolve().parents[1] / ".jax_cache")
)
# Subprocesses started by tests (CLI runs, 8-device runs) inherit these and share the cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# This workspace's real datasets (../shared/data: mnist, cifar10), where presets find them ($EXTKD_DATA_DIR/<name>)
if (pathlib.Path(__file__).resolve().parents[2] / "shared" / "data").is_dir():
    os.environ.setdefault("EXTKD_DATA_DIR", str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"))

import jax  # noqa: E402

from extkd_jax.train.xla_cache import sweep_incomplete  # noqa: E402
from tests.checkout import map_checkout_configs  # noqa: E402

map_checkout_configs()  # a checkout run without installing it (a device copy): its presets as extkd_jax.configs

sweep_incomplete(str(_CACHE))  # entries a test's SIGKILL cut short (JAX writes them in place, and keeps them)
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# float32 means float32 in the tests, also on GPUs whose default runs float32 matmuls and convs in TF32
jax.config.update("jax_default_matmul_precision", "highest")


REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> pathlib.Path:
    return REPO_ROOT


# runs that are later extended use a constant rate: num_epochs may change on resume only then
CONSTANT = {"optim.schedule": "constant"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
    """The tiny learnable data set (tests/tiny.py) in the npz layout."""
    from tests.tiny import write_tiny_npz

    return write_tiny_npz(tmp_path_factory.mktemp("data") / "mnist")


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory) -> pathlib.Path:
    """A finished 3-epoch `train` run at a constant rate, a checkpoint per epoch, all kept: steps 7, 14, 21."""
    from extkd_jax.train.loop import train_and_evaluate
    from tests.tiny import tiny_config

    workdir = tmp_path_factory.mktemp("finished") / "run"
    train_and_evaluate(tiny_config(data_dir, keep_checkpoints=3, **CONSTANT), workdir, mode="train")
    return workdir


@pytest.fixture
def copy_of_finished(finished, tmp_path) -> pathlib.Path:
    """A copy of `finished` that a test may damage."""
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    return workdir


@pytest.fixture
def examples_plugins(monkeypatch):
    """examples/ on sys.path for a test that imports a plug-in in-process; the methods it registers and the modules
    it imports are removed afterwards, so no other test of this worker sees them."""
    import sys

    from extkd_jax.methods import registry

    registry.method_names()  # the built-ins load on first use: load them before the snapshot
    saved, modules = dict(registry._METHODS), set(sys.modules)
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
    yield
    registry._METHODS.clear()
    registry._METHODS.update(saved)
    for name in set(sys.modules) - modules:
        if name in ("custom_method", "mlkd_ablation"):
            del sys.modules[name]
