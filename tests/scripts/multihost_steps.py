"""Data parallelism over several JAX processes on one machine (CPU collectives over gloo). Started by
tests/test_multihost.py; prints its results as JSON from process 0 only.

    python multihost_steps.py REPO_ROOT steps PROCESSES
    python multihost_steps.py REPO_ROOT train PROCESSES WORKDIR DATA_DIR EPOCHS

PROCESSES is `single` (one process, however many local devices) or `ID/COUNT/PORT` (process ID of COUNT, the
coordinator on 127.0.0.1:PORT). With 2 processes of 1 CPU device each the mesh has 2 devices on 2 processes.

`steps`: 3 distill steps (resnet8 teacher -> resnet8 student, extended_kd) as tests/scripts/steps_on_meshes.py
runs them, in both data placements. In one process the replicated placement runs on a 1-device mesh (its result
does not depend on the number of devices) and the sharded placement on every local device (its batches depend on
the number of devices: give the single process as many devices as the multi-process run has).

`train`: `train_and_evaluate` of the tiny MLP with data.placement='sharded' (what `auto` picks on several
processes) and a constant learning rate, started through config.distributed as `extkd train` would be; prints
what it returned and the metrics records of the workdir.
"""

import json
import sys

import jax

REPO_ROOT, TASK, PROCESSES = sys.argv[1], sys.argv[2], sys.argv[3]
SINGLE = PROCESSES == "single"
if not SINGLE:
    process_id, num_processes, port = (int(v) for v in PROCESSES.split("/"))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if TASK == "steps":  # `train` starts the runtime through config.distributed
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=120,
            heartbeat_timeout_seconds=30,
            shutdown_timeout_seconds=30,
        )

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

sys.path.insert(0, REPO_ROOT)
from extkd_jax.train import sharding
from extkd_jax.train.epoch import DeviceDataset, make_run_steps
from tests.tiny import resnet8_step_setup, tiny_config, tiny_setup


def run_steps_on(mesh, placement: str) -> dict:
    config, teacher, images, labels = resnet8_step_setup()
    sharding.check_batch_divisible(16, mesh)
    program = tiny_setup(config, (8, 8, 3), 4, teacher)
    run_steps = make_run_steps(program.step_fn, mesh, 16, "cifar", placement)
    data = DeviceDataset(images, labels, mesh, placement)
    # As train_and_evaluate does: every process derives the same keys and permutation.
    epoch_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(3), 1), 0)
    state, metrics = run_steps(
        sharding.put_replicated(program.init_state(), mesh),
        sharding.put_replicated(program.teacher_variables, mesh),
        data.images,
        data.labels,
        data.permutation(epoch_key),
        epoch_key,
        jnp.int32(0),
        num_steps=3,
    )
    state, metrics = sharding.to_host(state), sharding.to_host(metrics)
    return {
        "mesh_devices": int(mesh.devices.size),
        "steps_per_epoch": data.steps_per_epoch(16),
        "loss": np.asarray(metrics["loss"]).tolist(),
        "step": int(state.step),
        "params": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state.params)],
        "batch_stats": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state.batch_stats)],
    }


def steps_task() -> dict:
    everything = sharding.make_mesh()
    one_device = Mesh(np.asarray(jax.devices()[:1]), (sharding.DATA_AXIS,))
    return {
        "replicated": run_steps_on(one_device if SINGLE else everything, "replicated"),
        "sharded": run_steps_on(everything, "sharded"),
    }


def train_task(workdir: str, data_dir: str, epochs: int) -> dict:
    from extkd_jax.train.loop import train_and_evaluate
    from extkd_jax.train.metrics import read_metrics

    # a constant learning rate: a run resumed with more epochs then matches one started with them
    overrides = {"num_epochs": epochs, "data.placement": "sharded", "optim.schedule": "constant"}
    if not SINGLE:
        overrides.update(
            {
                "distributed.enabled": True,
                "distributed.coordinator_address": f"127.0.0.1:{port}",
                "distributed.num_processes": num_processes,
                "distributed.process_id": process_id,
            }
        )
    config = tiny_config(data_dir, **overrides)
    record = train_and_evaluate(config, workdir, mode="train")
    # what the run read: this process's rows of the transfer set, as the loop chooses them
    from jax.experimental import multihost_utils

    from extkd_jax.train.data import run_data

    datasets = run_data(config, sharding.make_mesh(), "sharded").datasets
    source = datasets.plan.train_source
    transfer_bytes = int(datasets.transfer.images.nbytes)
    gathered = multihost_utils.process_allgather(np.asarray([transfer_bytes, source.bytes_read]))
    return {
        "returned": record,
        "records": read_metrics(workdir),
        "transfer_bytes": np.asarray(gathered).reshape(-1, 2)[:, 0].tolist(),
        "bytes_read": np.asarray(gathered).reshape(-1, 2)[:, 1].tolist(),
        "transfer_rows": [datasets.transfer_rows.start, datasets.transfer_rows.stop],
        "transfer_size": datasets.transfer_size,
    }


if TASK == "steps":
    result = steps_task()
elif TASK == "train":
    result = train_task(sys.argv[4], sys.argv[5], int(sys.argv[6]))
else:
    raise SystemExit(f"unknown task {TASK!r}; expected steps or train")
if jax.process_index() == 0:
    print(
        json.dumps(
            {
                "process_count": jax.process_count(),
                "devices": jax.device_count(),
                "local_devices": jax.local_device_count(),
                **result,
            }
        )
    )
sys.stdout.flush()
