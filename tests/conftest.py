"""Shared test set-up: a persistent XLA compilation cache so repeated programs compile once."""

import os
import pathlib

import pytest

_CACHE = pathlib.Path(
    os.environ.get("EXTKD_TEST_JAX_CACHE", pathlib.Path(__file__).resolve().parents[1] / ".jax_cache")
)
# Subprocesses started by tests (CLI runs, 8-device runs) inherit these and share the cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# float32 means float32 in the tests, also on GPUs whose default runs float32 matmuls and convs in TF32
jax.config.update("jax_default_matmul_precision", "highest")


REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> pathlib.Path:
    return REPO_ROOT
