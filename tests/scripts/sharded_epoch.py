"""Checks the sharded data placement on every device (run with 8 fake CPU devices by test_engine.py).

Images carry their own index in their pixels; a recording step returns each batch, and the script prints JSON
facts about one epoch: which examples were used, and on which device each came from.
"""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, sys.argv[1])
from extkd_jax.train import sharding  # noqa: E402
from extkd_jax.train.epoch import DeviceDataset, make_run_steps  # noqa: E402
from extkd_jax.train.loop import train_and_evaluate  # noqa: E402
from tests.tiny import tiny_config, write_tiny_npz  # noqa: E402

mesh = sharding.make_mesh()
devices = mesh.devices.size
n, batch = 203, 16  # 203 = 8 * 25 + 3: three examples are left out
ids = np.arange(n)
images = np.stack([ids // 256, ids % 256], axis=-1).astype(np.uint8).reshape(n, 1, 1, 2)
images = np.broadcast_to(images, (n, 2, 2, 2)).copy()
labels = (ids % 10).astype(np.int32)
data = DeviceDataset(images, labels, mesh, "sharded")


def recording_step(state, teacher_vars, x, y, key, indices=None):
    return state, {"x": x, "y": y}


run_steps = make_run_steps(recording_step, mesh, batch, "none", placement="sharded")
steps = data.steps_per_epoch(batch)
key = jax.random.key(0)
_, out = run_steps(
    jnp.zeros(()), None, data.images, data.labels, data.permutation(key), key, jnp.int32(0), num_steps=steps
)
x = np.asarray(sharding.to_host(out["x"]))  # (steps, batch, 2, 2, 2)
used = x[:, :, 0, 0, 0].astype(int) * 256 + x[:, :, 0, 0, 1].astype(int)  # (steps, batch)
per_device = batch // devices
shard = n // devices
origin_ok = all(int(used[s, b]) // shard == b // per_device for s in range(steps) for b in range(batch))

workdir = pathlib.Path(sys.argv[2])
config = tiny_config(
    write_tiny_npz(workdir / "data" / "mnist"),
    **{"data.placement": "sharded", "batch_size": 48, "num_epochs": 10, "optim.learning_rate": 0.3},
)
record = train_and_evaluate(config, workdir / "run", mode="train")
print(
    json.dumps(
        {
            "devices": devices,
            "steps": steps,
            "used": used.ravel().tolist(),
            "origin_ok": origin_ok,
            "labels_match": bool(np.all(np.asarray(sharding.to_host(out["y"])) == used % 10)),
            "test_acc": record["test_acc"],
            "epochs": record["epoch"],
        }
    )
)
