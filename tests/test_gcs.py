"""gs:// workdirs against a real local GCS server (the emulator of ../shared/docs/gcs-emulator.md, patched by
tests/gcs_server.py: `etils.epath.testing.mock_epath` cannot reach Orbax's TensorStore driver): a full `extkd train`
with five checkpoints and a resume on gs://, and why the released emulator fails after the first checkpoint
(`Malformed StorageGeneration`: its media downloads lack the x-goog-generation header; see tests/gcs_server.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.test_multihost import _same_records
from tests.tiny import REPO_ROOT, write_tiny_npz


def _needs_emulator() -> None:
    for package in ("gcp_storage_emulator", "gcsfs", "google.cloud.storage", "tensorstore"):
        pytest.importorskip(package)


def _json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.slow
def test_released_emulator_breaks_ocdbt_commits_the_patched_one_does_not():
    """The emulator, not our code: the second commit to an OCDBT store (what each Orbax save after the first does
    to its manifest) fails on the released emulator because its media download of manifest.ocdbt carries no
    x-goog-generation header; with the header (tests/gcs_server.py) all three commits pass."""
    _needs_emulator()
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests/scripts/gcs_generation.py"), str(REPO_ROOT)],
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    result = _json(out.stdout)
    released, patched = result["released"], result["patched"]
    assert released["commits"][0] == "ok"
    for error in released["commits"][1:]:
        assert "manifest.ocdbt" in error and "Malformed StorageGeneration" in error
    assert released["manifest_read"] == {"status": 200, "x-goog-generation": None}
    assert patched["commits"] == ["ok", "ok", "ok"]
    assert int(patched["manifest_read"]["x-goog-generation"]) > 0


@pytest.mark.slow
def test_train_and_resume_on_a_gs_workdir(tmp_path):
    _needs_emulator()
    data_dir = write_tiny_npz(tmp_path / "data" / "mnist")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "tests/scripts/gcs_workdir.py"),
            str(REPO_ROOT),
            str(data_dir),
            str(tmp_path / "local"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    result = _json(out.stdout)
    assert result["status"] == [0, 0, 0]
    files = ["checkpoints", "config.json", "hparams.json", "metrics.jsonl", "scalars.jsonl", "tensorboard"]
    assert result["files"] == files
    assert result["events"] and result["loaded"] == "mlp"
    assert [r["epoch"] for r in result["remote"]] == [1, 2, 3, 4, 5]  # five saves, the last three after a resume
    assert result["steps"] == [28, 35]  # 7 steps an epoch; two kept, the older ones deleted on gs://
    _same_records(result["local"], result["remote"])  # resumed on gs:// = uninterrupted on disk
