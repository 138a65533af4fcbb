"""Why Orbax checkpoints on the released gcp-storage-emulator fail with `Malformed StorageGeneration`, and that the
patched server of tests/gcs_server.py does not. Started by tests/test_gcs.py; prints JSON.

    python gcs_generation.py REPO_ROOT

For each server (released, then patched): three commits to one TensorStore OCDBT store on gs:// (each through a new
context, as each Orbax save of a step opens its own), then the request TensorStore makes before the second commit,
`GET .../o/run%2Fmanifest.ocdbt?alt=media`, made again by hand to show its answer's headers.
"""

import json
import os
import sys
import urllib.request

sys.path.insert(0, sys.argv[1])
from tests import gcs_server

port = gcs_server.free_port()
url = f"http://localhost:{port}"
os.environ.update(gcs_server.environment(url))  # before TensorStore reads TENSORSTORE_GCS_HTTP_URL
import tensorstore as ts


def commits(prefix: str) -> list[str]:
    outcomes = []
    for i in range(3):
        store = ts.KvStore.open({"driver": "ocdbt", "base": f"gs://bucket/{prefix}/"}, context=ts.Context()).result()
        try:
            store.write(f"key{i}", b"value").result()
            outcomes.append("ok")
        except Exception as err:  # noqa: BLE001 - the error is the result
            outcomes.append(str(err))
    return outcomes


def manifest_headers(prefix: str) -> dict:
    request = f"{url}/storage/v1/b/bucket/o/{prefix}%2Fmanifest.ocdbt?alt=media"
    with urllib.request.urlopen(request) as answer:
        return {"status": answer.status, "x-goog-generation": answer.headers.get("x-goog-generation")}


result = {}
for name, patched in (("released", False), ("patched", True)):
    server, _ = gcs_server.start(port=port, patched=patched)
    try:
        result[name] = {"commits": commits(name), "manifest_read": manifest_headers(name)}
    finally:
        server.stop()
print(json.dumps(result))
sys.stdout.flush()
