"""Checks that matter most on an accelerator (benchmarks/device_check.sh runs `pytest -m accelerator` there).

They also pass on the CPU; on a GPU they show that the tests ran where they were meant to and that bf16 compute
with float32 parameters trains like float32.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from extkd_jax.train import sharding
from extkd_jax.train.epoch import make_run_steps
from tests.tiny import random_teacher, tiny_config, tiny_setup

pytestmark = pytest.mark.accelerator


def test_backend_is_the_one_requested():
    """With EXTKD_EXPECT_BACKEND (set by device_check.sh) the suite runs on that backend, not silently on CPU."""
    expected = os.environ.get("EXTKD_EXPECT_BACKEND")
    if not expected:
        pytest.skip("EXTKD_EXPECT_BACKEND not set (only device_check.sh sets it)")
    assert jax.default_backend() == expected, jax.devices()


def _distill_losses(compute_dtype: str, steps: int = 6) -> np.ndarray:
    config = tiny_config(
        ".",
        **{
            "model.name": "resnet8",
            "loss.name": "extended_kd",
            "batch_size": 16,
            "compute_dtype": compute_dtype,
            "optim.learning_rate": 0.05,
        },
    )
    config.model.kwargs = {}
    dtype = jnp.bfloat16 if compute_dtype == "bfloat16" else jnp.float32
    teacher = random_teacher("resnet14", dtype=dtype)
    program = tiny_setup(config, (8, 8, 3), steps, teacher)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(16, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(16,)).astype(np.int32)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (sharding.DATA_AXIS,))
    run_steps = make_run_steps(program.step_fn, mesh, 16, "none")
    state = sharding.put_replicated(program.init_state(), mesh)
    teacher_vars = sharding.put_replicated(program.teacher_variables, mesh)
    _, metrics = run_steps(
        state, teacher_vars, images, labels, jnp.arange(16), jax.random.key(0), jnp.int32(0), num_steps=steps
    )
    return np.asarray(metrics["loss"])


def test_bf16_distill_step_tracks_float32():
    """bf16 compute, float32 parameters: the same run's losses stay within bf16 rounding of float32's."""
    f32, bf16 = _distill_losses("float32"), _distill_losses("bfloat16")
    assert np.all(np.isfinite(bf16)) and bf16[-1] < bf16[0]
    np.testing.assert_allclose(bf16, f32, rtol=0.05)
