"""Runs 3 distill steps (resnet8 teacher -> resnet8 student, extended_kd) as tests/scripts/steps_on_meshes.py does,
in both data placements, and prints the results as JSON (process 0 only).

    python multihost_steps.py REPO_ROOT single
    python multihost_steps.py REPO_ROOT PROCESS_ID NUM_PROCESSES COORDINATOR_PORT

The second form starts JAX's multi-process runtime on this machine (CPU collectives over gloo), so with 2
processes of 1 CPU device each the mesh has 2 devices on 2 processes; both placements run on that mesh.
In the first form (one process) the replicated placement runs on a 1-device mesh (its result does not depend on
the number of devices) and the sharded placement on the mesh of every local device (its batches depend on the
number of devices: run it with as many devices as the multi-process run has). Started by tests/test_multihost.py.
"""

import json
import sys

import jax

REPO_ROOT, MODE = sys.argv[1], sys.argv[2]
if MODE != "single":
    process_id, num_processes, port = int(MODE), int(sys.argv[3]), int(sys.argv[4])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=120,
        heartbeat_timeout_seconds=30,
        shutdown_timeout_seconds=30,
    )

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

sys.path.insert(0, REPO_ROOT)
from tests.tiny import tiny_config  # noqa: E402

from extkd_jax.train import sharding  # noqa: E402
from extkd_jax.train.builders import build_model  # noqa: E402
from extkd_jax.train.epoch import DeviceDataset, make_run_steps  # noqa: E402
from extkd_jax.train.program import build_program  # noqa: E402
from extkd_jax.train.state import split_model  # noqa: E402

config = tiny_config(".", **{"model.name": "resnet8", "loss.name": "extended_kd", "batch_size": 16,
                             "data.augment": "cifar", "teacher.fold_batchnorm": True})
config.model.kwargs = {}
teacher = split_model(build_model("resnet8", {}, 10, seed=5, dtype=jnp.float32))
rng = np.random.default_rng(0)
images = rng.integers(0, 256, size=(64, 8, 8, 3), dtype=np.uint8)
labels = rng.integers(0, 10, size=(64,)).astype(np.int32)
mean, std = np.full(3, 120.0, np.float32), np.full(3, 60.0, np.float32)


def run(mesh, placement):
    sharding.check_batch_divisible(16, mesh)
    program = build_program(config, 10, (8, 8, 3), steps_per_epoch=4, teacher_parts=teacher)
    run_steps = make_run_steps(program.step_fn, mesh, 16, "cifar", mean, std, jnp.float32, placement)
    data = DeviceDataset(images, labels, mesh, placement)
    # As train_and_evaluate does: every process derives the same keys and permutation.
    epoch_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(3), 1), 0)
    state, metrics = run_steps(
        sharding.put_replicated(program.init_state(), mesh),
        sharding.put_replicated(program.teacher_vars, mesh),
        data.images, data.labels, data.permutation(epoch_key), epoch_key, jnp.int32(0), num_steps=3)
    state, metrics = sharding.to_host(state), sharding.to_host(metrics)
    return {
        "mesh_devices": int(mesh.devices.size),
        "steps_per_epoch": data.steps_per_epoch(16),
        "loss": np.asarray(metrics["loss"]).tolist(),
        "step": int(state.step),
        "params": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state.params)],
        "batch_stats": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state.batch_stats)],
    }


everything = sharding.make_mesh()
one_device = Mesh(np.asarray(jax.devices()[:1]), (sharding.DATA_AXIS,))
results = {
    "replicated": run(one_device if MODE == "single" else everything, "replicated"),
    "sharded": run(everything, "sharded"),
}
if jax.process_index() == 0:
    print(json.dumps({"process_count": jax.process_count(), "devices": jax.device_count(),
                      "local_devices": jax.local_device_count(), **results}))
sys.stdout.flush()
