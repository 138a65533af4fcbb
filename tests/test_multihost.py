"""Multi-host data parallelism on one machine: 2 JAX processes (1 CPU device each, gloo collectives) run the
same 3 distill steps as 1 process, with the same loss, parameters and BatchNorm statistics, in both data
placements (replicated: compared with 1 device; sharded: compared with 1 process of 2 devices, since which
examples a step takes depends on the number of devices, not of processes)."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.tiny import REPO_ROOT, write_tiny_npz

SCRIPT = REPO_ROOT / "tests/scripts/multihost_steps.py"
TIMEOUT_S = 240


def _env(devices: int = 1) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(folder: pathlib.Path, name: str, *args: str, devices: int = 1):
    """Starts the script with stdout/stderr in files (the JSON is megabytes: a pipe would fill and block)."""
    out, err = folder / f"{name}.out", folder / f"{name}.err"
    with out.open("w") as fo, err.open("w") as fe:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), str(REPO_ROOT), *args],
            env=_env(devices),
            cwd=REPO_ROOT,
            stdout=fo,
            stderr=fe,
            text=True,
        )
    return proc, out, err


def _finish(started: list, timeout: float) -> list[str]:
    """Waits for every process and returns their stdout; on a timeout or a failure of one, kills the others
    (a peer would otherwise wait for it until its own timeout) so that no process outlives the test."""
    procs = [p for p, _, _ in started]
    deadline = time.time() + timeout
    try:
        while any(p.poll() is None for p in procs):
            for i, (p, _, err) in enumerate(started):
                if p.poll() not in (None, 0):
                    raise RuntimeError(f"process {i} failed with status {p.returncode}:\n{err.read_text()[-4000:]}")
            if time.time() > deadline:
                tails = "\n".join(f"process {i}: {err.read_text()[-2000:]}" for i, (_, _, err) in enumerate(started))
                raise TimeoutError(f"the processes did not finish within {timeout} s:\n{tails}")
            time.sleep(0.1)
        for i, (p, _, err) in enumerate(started):
            assert p.returncode == 0, f"process {i} failed with status {p.returncode}:\n{err.read_text()[-4000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [out.read_text() for _, out, _ in started]


def _result(stdout: str) -> dict:
    """The JSON line (gloo also prints its own lines to stdout)."""
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def _max_diff(a: list, b: list) -> float:
    assert len(a) == len(b)
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    # one process with 2 CPU devices: the replicated placement runs on 1 of them, the sharded one on both
    [single_out] = _finish([_start(tmp_path, "single", "steps", "single", devices=2)], TIMEOUT_S)
    single = _result(single_out)
    assert single["process_count"] == 1 and single["devices"] == 2
    assert single["replicated"]["mesh_devices"] == 1 and single["sharded"]["mesh_devices"] == 2

    port = _free_port()
    outputs = _finish([_start(tmp_path, f"process{i}", "steps", f"{i}/2/{port}") for i in range(2)], TIMEOUT_S)
    multi = _result(outputs[0])
    assert not any(line.startswith("{") for line in outputs[1].splitlines()), "only process 0 prints results"
    assert multi["process_count"] == 2 and multi["devices"] == 2 and multi["local_devices"] == 1

    for placement in ("replicated", "sharded"):
        a, b = multi[placement], single[placement]
        assert a["mesh_devices"] == 2
        assert a["step"] == b["step"] == 3
        assert a["steps_per_epoch"] == b["steps_per_epoch"] == 4
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=0, atol=1e-5, err_msg=placement)
        assert _max_diff(a["params"], b["params"]) <= 1e-5, placement
        assert _max_diff(a["batch_stats"], b["batch_stats"]) <= 1e-5, placement
        assert b["loss"][0] != b["loss"][-1]  # the steps changed the parameters
    # the two placements draw different batches: the sharded comparison is not the replicated one again
    assert single["replicated"]["loss"] != single["sharded"]["loss"]


TIMING = ("epoch_time_s", "img_per_s", "wall_time_s")


def _same_records(a: list[dict], b: list[dict]) -> None:
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for ra, rb in zip(a, b):
        for k in ra:
            if k not in TIMING:
                np.testing.assert_allclose(
                    np.asarray(rb[k], float),
                    np.asarray(ra[k], float),
                    rtol=1e-5,
                    atol=1e-6,
                    err_msg=f"{k} at epoch {ra['epoch']}",
                )


@pytest.mark.slow
def test_two_process_training_checkpoints_and_resumes_like_one_process(tmp_path):
    """`train_and_evaluate` on 2 processes (sharded data, each process reading only its rows of the transfer set,
    orbax checkpoints written by both, metrics by process 0), stopped after epoch 1 and resumed to epoch 2, gives
    the records of 1 process with 2 devices."""
    data_dir = write_tiny_npz(tmp_path / "data" / "mnist")
    single_dir, multi_dir = tmp_path / "single_run", tmp_path / "multi_run"
    [out] = _finish(
        [_start(tmp_path, "train_single", "train", "single", str(single_dir), str(data_dir), "2", devices=2)], TIMEOUT_S
    )
    single = _result(out)
    assert [r["epoch"] for r in single["records"]] == [1, 2]

    for epochs in (1, 2):  # the second launch resumes from the first one's checkpoint
        port = _free_port()
        outputs = _finish(
            [
                _start(
                    tmp_path, f"train{epochs}_{i}", "train", f"{i}/2/{port}", str(multi_dir), str(data_dir), str(epochs)
                )
                for i in range(2)
            ],
            TIMEOUT_S,
        )
        multi = _result(outputs[0])
        assert multi["process_count"] == 2 and multi["devices"] == 2
        assert multi["returned"]["epoch"] == epochs
        if epochs == 1:
            first_epoch_line = (multi_dir / "metrics.jsonl").read_text().splitlines()[0]
    # resumed, not restarted: epoch 1's record (with its timings) was kept as the first launch wrote it
    assert (multi_dir / "metrics.jsonl").read_text().splitlines()[0] == first_epoch_line
    assert sorted(int(p.name) for p in (multi_dir / "checkpoints").iterdir()) == [7, 14]
    assert len((multi_dir / "metrics.jsonl").read_text().splitlines()) == 2  # process 0 wrote, once per epoch
    _same_records(single["records"], multi["records"])
    # each process read only its own rows of the transfer set: half the single process's bytes, the same results
    whole = single["transfer_bytes"][0]
    assert single["transfer_rows"] == [0, single["transfer_size"]]
    assert multi["transfer_bytes"] == [whole // 2, whole // 2]
    assert max(multi["bytes_read"]) < single["bytes_read"][0]
