"""`extkd train` and its resume on a gs:// workdir, against a real local GCS server (gcp-storage-emulator, patched:
tests/gcs_server.py): Orbax's TensorStore driver, gcsfs (epath) and the metrics all reach it. Five checkpoints
(2 epochs, then resumed to 5; two kept, so older steps are deleted on gs:// too). Started by tests/test_gcs.py;
prints JSON.

    python gcs_workdir.py REPO_ROOT DATA_DIR LOCAL_WORKDIR
"""

import json
import os
import sys
import time

sys.path.insert(0, sys.argv[1])
from tests import gcs_server

server, url = gcs_server.start()
os.environ.update(gcs_server.environment(url))  # before anything touches gs://
from etils import epath

import extkd_jax
from extkd_jax import cli
from extkd_jax.train.metrics import read_metrics

data_dir, local = sys.argv[2], sys.argv[3]
flags = [
    "--config=" + os.path.join(sys.argv[1], "tests/scripts/tiny_config.py"),
    f"--config.data.dir={data_dir}",
    "--config.optim.schedule=constant",
]
started = time.time()
status = [
    cli.main(["train", *flags, "--config.num_epochs=2", "--workdir=gs://bucket/run"]),
    cli.main(["train", *flags, "--config.num_epochs=5", "--workdir=gs://bucket/run"]),  # resumes
]
remote_seconds = time.time() - started
status.append(cli.main(["train", *flags, "--config.num_epochs=5", f"--workdir={local}"]))
remote = epath.Path("gs://bucket/run")
print(
    json.dumps(
        {
            "status": status,
            "remote_seconds": remote_seconds,
            "steps": sorted(int(p.name) for p in (remote / "checkpoints").iterdir() if p.name.isdigit()),
            "files": sorted(p.name for p in remote.iterdir()),
            "events": sorted(p.name for p in (remote / "tensorboard").iterdir()),
            "remote": read_metrics(remote),
            "local": read_metrics(local),
            "loaded": extkd_jax.load(remote).card["model"]["name"],
        }
    )
)
sys.stdout.flush()
server.stop()
