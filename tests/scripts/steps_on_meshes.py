"""Runs 3 distill steps (resnet8 teacher -> resnet8 student, extended_kd) on a 1-device mesh and on a mesh of
every device, printing the largest differences of loss and parameters as JSON. Started by test_engine.py with
XLA_FLAGS=--xla_force_host_platform_device_count=8."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

sys.path.insert(0, sys.argv[1])
from extkd_jax.train import sharding  # noqa: E402
from extkd_jax.train.epoch import epoch_permutation, make_run_steps  # noqa: E402
from tests.tiny import resnet8_step_setup, tiny_setup  # noqa: E402

config, teacher, images, labels = resnet8_step_setup(sys.argv[2] == "fold")


def run(devices):
    mesh = Mesh(np.asarray(devices), (sharding.DATA_AXIS,))
    program = tiny_setup(config, (8, 8, 3), 4, teacher)
    run_steps = make_run_steps(program.step_fn, mesh, 16, "cifar")
    key = jax.random.key(3)
    state, metrics = run_steps(
        sharding.put_replicated(program.init_state(), mesh),
        sharding.put_replicated(program.teacher_variables, mesh),
        sharding.put_replicated(images, mesh),
        sharding.put_replicated(labels, mesh),
        epoch_permutation(key, 64),
        key,
        jnp.int32(0),
        num_steps=3,
    )
    return sharding.to_host(state), sharding.to_host(metrics)


one_state, one_metrics = run(jax.devices()[:1])
all_state, all_metrics = run(jax.devices())
param_diff = max(
    float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(one_state.params), jax.tree.leaves(all_state.params))
)
stats_diff = max(
    float(np.max(np.abs(a - b)))
    for a, b in zip(jax.tree.leaves(one_state.batch_stats), jax.tree.leaves(all_state.batch_stats))
)
print(
    json.dumps(
        {
            "devices": jax.device_count(),
            "loss_one": one_metrics["loss"].tolist(),
            "loss_all": all_metrics["loss"].tolist(),
            "loss_diff": float(np.max(np.abs(one_metrics["loss"] - all_metrics["loss"]))),
            "param_diff": param_diff,
            "stats_diff": stats_diff,
        }
    )
)
