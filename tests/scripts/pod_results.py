"""What a finished run left in its workdir, for tests/test_pod_rehearsal.py: the epoch records of metrics.jsonl and
the trained model's parameters (as `extkd_jax.load` restores them), local or gs:// (through the local GCS server at
URL). Prints JSON {workdir: {"records": [...], "params": [[...], ...]}}.

    python pod_results.py REPO_ROOT URL WORKDIR...
"""

import json
import os
import sys

sys.path.insert(0, sys.argv[1])
from tests import gcs_server

os.environ.update(gcs_server.environment(sys.argv[2]))  # before anything touches gs://
import jax
import numpy as np

import extkd_jax
from extkd_jax.train.metrics import read_metrics

result = {}
for workdir in sys.argv[3:]:
    model = extkd_jax.load(workdir)
    params = [np.asarray(leaf, np.float64).ravel().tolist() for leaf in jax.tree.leaves(model.variables["params"])]
    result[workdir] = {"records": read_metrics(workdir), "params": params}
print(json.dumps(result))
sys.stdout.flush()
