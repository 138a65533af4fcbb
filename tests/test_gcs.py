"""gs:// workdirs: a full `extkd train` and its resume on gs://, against a real local GCS server (the emulator of
docs/../shared/docs/gcs-emulator.md: `etils.epath.testing.mock_epath` cannot reach Orbax's TensorStore driver)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.test_multihost import _same_records
from tests.tiny import REPO_ROOT, write_tiny_npz


@pytest.mark.slow
def test_train_and_resume_on_a_gs_workdir(tmp_path):
    for package in ("gcp_storage_emulator", "gcsfs", "google.cloud.storage"):
        pytest.importorskip(package)
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
    result = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    assert result["status"] == [0, 0, 0]
    assert result["files"] == ["checkpoints", "config.json", "metrics.jsonl", "tensorboard"]
    assert result["events"] and result["loaded"] == "mlp"
    assert [r["epoch"] for r in result["remote"]] == [1, 2]
    _same_records(result["local"], result["remote"])  # resumed on gs:// = uninterrupted on disk
