"""The TPU pod path rehearsed on CPU: two "workers" run the exact start command that `launch/tpu_vm.sh --dry-run`
prints for a 2-host slice, data and workdir on a local GCS server (tests/gcs_server.py).

What stands in for the TPU VM, and nothing more: each worker is a home directory holding what the install step
leaves there (`~/extkd_jax`: this checkout; `~/extkd_venv/bin`: this Python's), `TPU_WORKER_ID` (how the command
numbers its worker when there is no metadata server), a `gcloud` on PATH that implements only `gcloud storage cp`
(the job copies its log into the gs:// workdir with it), and the coordinator and process numbers in SLURM's variables,
which `jax.distributed.initialize()` auto-detects as it auto-detects them from the metadata on a TPU VM. The two JAX
processes talk over gloo on the loopback, as in tests/test_multihost.py. PYTHONPATH names the checkout because
the test's config file imports tests.tiny.

The run is SIGKILLed on both workers (their process groups, from the pid files the command writes) once the first
checkpoint is committed, then the same command is started again, as `--relaunch` does on a re-created VM: it
resumes from the gs:// checkpoints, and its records and parameters equal those of one process with two devices.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.test_multihost import _free_port, _result, _same_records
from tests.tiny import REPO_ROOT, write_tiny_npz

NAME = "rehearsal"
BUCKET = "bucket"
COMMAND = (
    "extkd train --config=tests/scripts/tiny_config.py --config.num_epochs=3 --config.optim.schedule=constant"
    " --config.data.placement=sharded"
)
TIMEOUT_S = 150

_GCLOUD_STUB = """#!{python}
# gcloud storage cp LOCAL gs://BUCKET/NAME, against the local GCS server ($STORAGE_EMULATOR_HOST); nothing else.
import os, sys
sys.path.insert(0, {repo!r})
from tests import gcs_server
assert sys.argv[1:3] == ["storage", "cp"] and sys.argv[4].startswith("gs://"), sys.argv
bucket, name = sys.argv[4][len("gs://"):].split("/", 1)
with open(sys.argv[3], "rb") as f:
    gcs_server.write_object(os.environ["STORAGE_EMULATOR_HOST"], bucket, name, f.read())
"""


def _dry_run_commands() -> tuple[str, str]:
    """(start, status check): the --command of the two ssh lines `tpu_vm.sh --dry-run` prints for the workers."""
    out = subprocess.run(
        [
            shutil.which("bash") or "/bin/bash",
            str(REPO_ROOT / "launch/tpu_vm.sh"),
            f"--name={NAME}",
            "--zone=us-central2-b",
            "--accelerator-type=v4-16",  # two hosts
            "--skip-create",
            "--skip-install",
            f"--workdir=gs://{BUCKET}/run",
            f"--data=gs://{BUCKET}/data/mnist",
            f"--command={COMMAND}",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    ssh = [
        shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ gcloud compute tpus tpu-vm ssh")
    ]
    (start,) = [c for c in ssh if "--worker=all" in c]
    (status,) = [c for c in ssh if "--worker=0" in c]
    command = [a for a in start if a.startswith("--command=")][0].split("=", 1)[1]
    check = [a for a in status if a.startswith("--command=")][0].split("=", 1)[1]
    assert f"--workdir=gs://{BUCKET}/run --config.data.dir=gs://{BUCKET}/data/mnist" in command
    return command, check


def _worker_home(root: pathlib.Path, i: int) -> pathlib.Path:
    home = root / f"worker{i}"
    (home / "extkd_venv").mkdir(parents=True)
    (home / "extkd_jax").symlink_to(REPO_ROOT)
    (home / "extkd_venv" / "bin").symlink_to(pathlib.Path(sys.executable).parent)
    return home


def _worker_env(home: pathlib.Path, i: int, port: int, url: str, stubs: pathlib.Path) -> dict:
    from tests import gcs_server

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith(("SLURM_", "TPU_"))}
    env.update(gcs_server.environment(url))
    env.update(
        HOME=str(home),
        PATH=f"{stubs}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(REPO_ROOT),
        JAX_PLATFORMS="cpu",
        TPU_WORKER_ID=str(i),
        SLURM_JOB_ID="1",
        SLURM_STEP_NODELIST="127.0.0.1",
        SLURM_NTASKS="2",
        SLURM_PROCID=str(i),
        SLURM_LOCALID="0",
        JAX_COORDINATOR_PORT=str(port),
    )
    return env


def _start(command: str, homes: list, url: str, stubs: pathlib.Path) -> list[dict]:
    port = _free_port()
    envs = [_worker_env(home, i, port, url, stubs) for i, home in enumerate(homes)]
    for i, (home, env) in enumerate(zip(homes, envs)):
        out = subprocess.run(["bash", "-c", command], env=env, cwd=home, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"worker {i}: started"), out.stdout  # detached: the command returned
    return envs


def _logs(home: pathlib.Path) -> pathlib.Path:
    return home / "extkd_logs" / NAME


def _tails(homes) -> str:
    return "\n".join(
        f"worker {i}: {(_logs(h) / f'worker-{i}.log').read_text()[-3000:]}"
        for i, h in enumerate(homes)
        if (_logs(h) / f"worker-{i}.log").exists()
    )


def _wait(condition, homes, what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.time() + timeout
    while not condition():
        for i, home in enumerate(homes):
            status = _logs(home) / "status"
            if status.exists() and status.read_text().strip() != "0":
                raise AssertionError(f"worker {i} failed while waiting for {what}:\n{_tails(homes)}")
        if time.time() > deadline:
            raise TimeoutError(f"no {what} within {timeout} s:\n{_tails(homes)}")
        time.sleep(0.1)


def _kill(homes) -> None:
    for home in homes:
        pid_file = _logs(home) / "pid"
        if pid_file.exists():
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)  # setsid: the job leads its process group
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_pod_start_command_killed_and_relaunched_matches_one_process(tmp_path):
    for package in ("gcp_storage_emulator", "gcsfs", "google.cloud.storage"):
        pytest.importorskip(package)
    from tests import gcs_server

    command, status_check = _dry_run_commands()
    data = write_tiny_npz(tmp_path / "data" / "mnist")
    server, url = gcs_server.start(BUCKET)
    homes = [_worker_home(tmp_path, i) for i in range(2)]
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "gcloud").write_text(_GCLOUD_STUB.format(python=sys.executable, repo=str(REPO_ROOT)))
    (stubs / "gcloud").chmod(0o755)
    try:
        gcs_server.upload_folder(url, data, BUCKET, "data/mnist")

        def committed() -> list[int]:  # the steps whose checkpoint is complete (each item has its own marker)
            names = [n.split("/") for n in gcs_server.list_objects(url, BUCKET, "run/checkpoints/")]
            return sorted(int(n[2]) for n in names if len(n) == 4 and n[3] == "commit_success.txt")

        _start(command, homes, url, stubs)
        _wait(committed, homes, "first checkpoint")
        _kill(homes)
        assert not any((_logs(h) / "status").exists() for h in homes), "the job ended before it was killed"
        killed_at = committed()
        first_line = gcs_server.read_object(url, BUCKET, "run/metrics.jsonl").decode().splitlines()[0]

        envs = _start(command, homes, url, stubs)  # a relaunch: the same command on the same workdir
        _wait(lambda: all((_logs(h) / "status").exists() for h in homes), homes, "end of the resumed run")
        status = subprocess.run(["bash", "-c", status_check], env=envs[0], capture_output=True, text=True, timeout=30)
        assert status.stdout.strip() == "0", _tails(homes)  # what the launcher's wait reads on worker 0
        assert (_logs(homes[1]) / "status").read_text().strip() == "0", _tails(homes)

        lines = gcs_server.read_object(url, BUCKET, "run/metrics.jsonl").decode().splitlines()
        assert lines[0] == first_line  # resumed, not restarted: epoch 1 as the killed run wrote it
        assert killed_at[0] == 7 and committed() == [14, 21]  # 7 steps an epoch, two checkpoints kept
        for i, home in enumerate(homes):  # each worker's log, copied into the workdir when its job ended
            log = gcs_server.read_object(url, BUCKET, f"run/logs/worker-{i}.log")
            assert log == (_logs(home) / f"worker-{i}.log").read_bytes() and b'"epoch": 3' in log

        single_dir = tmp_path / "single"
        single_env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        single_env.update(
            JAX_PLATFORMS="cpu",
            PYTHONPATH=str(REPO_ROOT),
            XLA_FLAGS="--xla_force_host_platform_device_count=2",
        )
        single = subprocess.run(
            [*shlex.split(COMMAND), f"--workdir={single_dir}", f"--config.data.dir={data}"],
            env=single_env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        assert single.returncode == 0, single.stderr[-4000:]

        results = subprocess.run(
            [
                sys.executable,
                str(REPO_ROOT / "tests/scripts/pod_results.py"),
                str(REPO_ROOT),
                url,
                f"gs://{BUCKET}/run",
                str(single_dir),
            ],
            env={**single_env, "XLA_FLAGS": ""},
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        assert results.returncode == 0, results.stderr[-4000:]
        got = _result(results.stdout)
        pod, one = got[f"gs://{BUCKET}/run"], got[str(single_dir)]
        assert [r["epoch"] for r in pod["records"]] == [1, 2, 3]
        _same_records(one["records"], pod["records"])  # losses, accuracies (test_acc) epoch by epoch
        assert len(pod["params"]) == len(one["params"])
        for a, b in zip(pod["params"], one["params"]):
            assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5
    finally:
        _kill(homes)
        server.stop()
