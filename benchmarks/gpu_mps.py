"""CUDA MPS for several processes on one GPU: their kernels then share the multiprocessors instead of taking turns.

Used by paper_scale.py for its student processes (`--mps`): started with its pipe and log directories under a work
folder, checked with one tiny JAX program, stopped again when that fails or when the processes are done.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

MPS_CHECK = (
    "import jax, jax.numpy as jnp; assert jax.devices()[0].platform == 'gpu', jax.devices(); print(jnp.ones(8).sum())"
)


def start_mps(call: Any, env: dict, work: Path) -> dict | None:
    """CUDA MPS for the students (their kernels then share the GPU's multiprocessors instead of taking turns):
    the environment that reaches its daemon, checked by one tiny JAX program; None (daemon stopped) if that fails.
    `call` is paper_scale's Call (record, run, left, phases): the check is one of its phases."""
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        call.record("mps", "off: no nvidia-cuda-mps-control", 0, 0)
        return None
    mps_env = {
        **env,
        "CUDA_MPS_PIPE_DIRECTORY": str(work / "mps_pipe"),
        "CUDA_MPS_LOG_DIRECTORY": str(work / "mps_log"),
    }
    for key in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"):
        Path(mps_env[key]).mkdir(parents=True, exist_ok=True)
    try:
        started = subprocess.run([control, "-d"], env=mps_env, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        started = False
    if started and call.run("mps", [sys.executable, "-c", MPS_CHECK], min(60.0, call.left() / 4), mps_env):
        return mps_env
    stop_mps(mps_env)
    phase = call.phases.setdefault("mps", {"status": "the daemon did not start", "limit_s": 0, "seconds": 0})
    phase["status"] = f"off: {phase['status']}"
    return None


def stop_mps(env: dict) -> None:
    control = shutil.which("nvidia-cuda-mps-control")
    """Asks the daemon that `env` reaches to quit (its clients are done)."""
    if control:
        try:
            subprocess.run([control], input="quit\n", text=True, env=env, capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            pass
