"""`extkd train` and its resume on a gs:// workdir, against a real local GCS server (gcp-storage-emulator): Orbax's
TensorStore driver, gcsfs (epath) and the metrics all reach it. Started by tests/test_gcs.py; prints JSON.

    python gcs_workdir.py REPO_ROOT DATA_DIR LOCAL_WORKDIR
"""

import json
import os
import socket
import sys

with socket.socket() as s:  # a free port: parallel tests do not collide
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
# before anything touches gs://: gcsfs and google-cloud-storage, TensorStore (so Orbax), a project
os.environ.update(
    STORAGE_EMULATOR_HOST=f"http://localhost:{port}",
    TENSORSTORE_GCS_HTTP_URL=f"http://localhost:{port}",
    GOOGLE_CLOUD_PROJECT="test",
)
from gcp_storage_emulator.server import create_server

server = create_server("localhost", port, in_memory=True, default_bucket="bucket")
server.start()
sys.path.insert(0, sys.argv[1])
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
status = [
    cli.main(["train", *flags, "--config.num_epochs=1", "--workdir=gs://bucket/run"]),
    cli.main(["train", *flags, "--config.num_epochs=2", "--workdir=gs://bucket/run"]),  # resumes
    cli.main(["train", *flags, "--config.num_epochs=2", f"--workdir={local}"]),
]
remote = epath.Path("gs://bucket/run")
print(
    json.dumps(
        {
            "status": status,
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
