"""The launch scripts (launch/*.sh): dry-run output, flag errors, and real runs against stub commands.

Nothing here needs gcloud, a GPU or the network: the scripts run under `bash` with a PATH whose first entry holds
stub `gcloud`, `nvidia-smi` and `extkd` programs that only log how they were called.
"""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO_ROOT / "launch"
BASH = shutil.which("bash") or "/bin/bash"
SCRIPTS = ["tpu_vm.sh", "gpu.sh", "local_cpu.sh"]
GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
ZONE = "us-central2-b"

_STUB = """#!{python}
import json, os, re, sys
name = os.path.basename(sys.argv[0])
entry = {{"name": name, "argv": sys.argv[1:], "cwd": os.getcwd(),
          "env": {{k: os.environ.get(k) for k in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "JAX_PLATFORMS")}}}}
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps(entry) + "\\n")
fail = os.environ.get("STUB_FAIL_RE")
sys.exit(3 if fail and re.search(fail, " ".join([name] + sys.argv[1:])) else 0)
"""


@pytest.fixture
def env(tmp_path):
    """Environment for the scripts: stubs first on PATH, a private TMPDIR, no inherited defaults."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in ("gcloud", "nvidia-smi", "extkd"):
        path = stubs / name
        path.write_text(_STUB.format(python=sys.executable))
        path.chmod(0o755)
    e = dict(os.environ)
    for key in ("CLOUDSDK_COMPUTE_ZONE", "WORKDIR", "XLA_PYTHON_CLIENT_MEM_FRACTION", "STUB_FAIL_RE", "PYTHON"):
        e.pop(key, None)
    e["PATH"] = f"{stubs}{os.pathsep}{e.get('PATH', '')}"
    e["STUB_LOG"] = str(tmp_path / "stub_log.jsonl")
    e["TMPDIR"] = str(tmp_path)
    return e


def run(script, *args, env, cwd=None):
    return subprocess.run(
        [BASH, str(LAUNCH / script), *args],
        env=env,
        cwd=cwd or env["TMPDIR"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def stub_calls(env):
    log = pathlib.Path(env["STUB_LOG"])
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def dry_run(script, *args, env):
    """Run with --dry-run; return the printed commands as argv lists (parsed back with shlex)."""
    res = run(script, *args, "--dry-run", env=env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), res.stdout
    assert stub_calls(env) == [], "dry-run must not run anything"
    return [shlex.split(line[2:]) for line in lines]


def find(cmds, pred, what):
    hits = [i for i, c in enumerate(cmds) if pred(c)]
    assert len(hits) == 1, f"expected one {what} command, found {len(hits)} in {cmds}"
    return hits[0]


def is_gcloud(sub):
    return lambda c: c[:5] == GCLOUD_TPU + [sub]


def option(cmd, name):
    """Value of --name=VALUE in cmd (None if absent)."""
    values = [a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}=")]
    assert len(values) <= 1, cmd
    return values[0] if values else None


def assert_failed(res, *needles):
    assert res.returncode != 0
    assert res.stdout == ""
    for needle in needles:
        assert needle in res.stderr, res.stderr


# ---------------------------------------------------------------- tpu_vm.sh


def test_tpu_dry_run_commands_in_order(env):
    cmds = dry_run("tpu_vm.sh", "--name=kd-v4", f"--zone={ZONE}", "--delete", env=env)
    create = find(cmds, is_gcloud("create"), "create")
    scp_code = find(cmds, lambda c: is_gcloud("scp")(c) and "--worker=all" in c, "scp of the code")
    ssh = [i for i, c in enumerate(cmds) if is_gcloud("ssh")(c)]
    assert len(ssh) == 2, cmds
    install, launch = ssh
    fetch = find(cmds, lambda c: is_gcloud("scp")(c) and "--worker=0" in c, "scp back")
    delete = find(cmds, is_gcloud("delete"), "delete")
    assert create < scp_code < install < launch < fetch < delete == len(cmds) - 1

    assert cmds[create] == GCLOUD_TPU + [
        "create",
        "kd-v4",
        f"--zone={ZONE}",
        "--accelerator-type=v4-8",
        "--version=tpu-ubuntu2204-base",
    ]
    assert cmds[scp_code][6] == "kd-v4:extkd_jax.tar.gz"
    tarball = cmds[scp_code][5]
    assert any(c[:3] == ["tar", "-czf", tarball] for c in cmds[:scp_code])

    for i in (install, launch):
        assert cmds[i][5] == "kd-v4" and "--worker=all" in cmds[i] and option(cmds[i], "zone") == ZONE
    install_cmd = option(cmds[install], "command")
    assert "tar -xzf ~/extkd_jax.tar.gz" in install_cmd
    assert 'pip install -e ".[all]" "jax[tpu]"' in install_cmd
    run_cmd = option(cmds[launch], "command")
    assert (
        "extkd reproduce --config=cifar10_drop --workdir=/tmp/extkd_run --config.distributed.enabled=True"
    ) in run_cmd

    assert cmds[fetch][:8] == GCLOUD_TPU + ["scp", "--worker=0", "--recurse", "kd-v4:/tmp/extkd_run"]
    assert cmds[fetch][8] == str(REPO_ROOT / "workdirs" / "kd-v4")
    assert cmds[delete] == GCLOUD_TPU + ["delete", "kd-v4", f"--zone={ZONE}", "--quiet"]


def test_tpu_dry_run_needs_no_gcloud(env, tmp_path):
    """With only the few tools the script uses on PATH (no gcloud anywhere), --dry-run still works."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("basename", "dirname", "xargs", "printf"):
        (tools / tool).symlink_to(shutil.which(tool))
    env["PATH"] = str(tools)
    cmds = dry_run("tpu_vm.sh", "--name=kd", f"--zone={ZONE}", env=env)
    assert cmds[0][:5] == GCLOUD_TPU + ["create"]
    res = run("tpu_vm.sh", "--name=kd", f"--zone={ZONE}", env=env)
    assert_failed(res, "'gcloud' not found")


def test_tpu_without_delete_keeps_the_vm(env):
    cmds = dry_run("tpu_vm.sh", "--name=kd", f"--zone={ZONE}", env=env)
    assert not any(is_gcloud("delete")(c) for c in cmds)
    assert is_gcloud("scp")(cmds[-1]) and "--worker=0" in cmds[-1]


@pytest.mark.parametrize("flag", ["--spot", "--preemptible"])
def test_tpu_spot_or_preemptible(env, flag):
    cmds = dry_run("tpu_vm.sh", "--name=kd", f"--zone={ZONE}", flag, env=env)
    (create,) = [c for c in cmds if is_gcloud("create")(c)]
    assert create[-1] == flag
    assert [a for a in create if a in ("--spot", "--preemptible")] == [flag]


def test_tpu_spot_and_preemptible_conflict(env):
    res = run("tpu_vm.sh", "--name=kd", f"--zone={ZONE}", "--spot", "--preemptible", "--dry-run", env=env)
    assert_failed(res, "--spot and --preemptible cannot be used together")
    assert stub_calls(env) == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_flag_is_named(env, script):
    res = run(script, "--dry-run", "--frobnicate=3", env=env)
    assert res.returncode == 2
    assert_failed(res, "unknown flag '--frobnicate'", "--help")
    res = run(script, "--dry-run", "stray", env=env)
    assert_failed(res, "unexpected argument 'stray'")


def test_tpu_missing_or_bad_values(env):
    assert_failed(run("tpu_vm.sh", f"--zone={ZONE}", "--dry-run", env=env), "--name is required")
    assert_failed(run("tpu_vm.sh", "--name=kd", "--dry-run", env=env), "--zone is required")
    assert_failed(run("tpu_vm.sh", "--name=kd", "--dry-run", "--zone", env=env), "--zone needs a value")
    assert_failed(
        run("tpu_vm.sh", "--name", "--zone", ZONE, "--dry-run", env=env), "--name needs a value, got the flag '--zone'"
    )
    assert_failed(run("tpu_vm.sh", "--name=My_VM", f"--zone={ZONE}", "--dry-run", env=env), "invalid --name 'My_VM'")
    assert_failed(
        run("tpu_vm.sh", "--name=kd", f"--zone={ZONE}", "--accelerator-type=tpu8", "--dry-run", env=env),
        "invalid --accelerator-type 'tpu8'",
    )
    assert_failed(
        run("tpu_vm.sh", "--name=kd", f"--zone={ZONE}", "--workdir=runs/x", "--dry-run", env=env),
        "--workdir must be an absolute path or a gs://bucket/path URL, got 'runs/x'",
    )
    assert_failed(
        run("tpu_vm.sh", "--name=kd", f"--zone={ZONE}", "--command=extkd train --workdir=/x", "--dry-run", env=env),
        "--command must not contain --workdir",
    )
    assert_failed(
        run("tpu_vm.sh", "--name=kd", f"--zone={ZONE}", "--ref=main", "--dry-run", env=env), "--ref 'main' needs --repo"
    )


def test_tpu_zone_from_environment(env):
    env["CLOUDSDK_COMPUTE_ZONE"] = "europe-west4-a"
    cmds = dry_run("tpu_vm.sh", "--name=kd", env=env)
    assert all(option(c, "zone") == "europe-west4-a" for c in cmds if c[0] == "gcloud")


def test_tpu_delete_only(env):
    cmds = dry_run("tpu_vm.sh", "--name=kd", f"--zone={ZONE}", "--delete-only", "--spot", env=env)
    assert cmds == [GCLOUD_TPU + ["delete", "kd", f"--zone={ZONE}", "--quiet"]]


def test_tpu_project_on_every_gcloud_command(env):
    cmds = dry_run("tpu_vm.sh", "--name=kd", f"--zone={ZONE}", "--project", "my-proj", "--delete", env=env)
    gcloud = [c for c in cmds if c[0] == "gcloud"]
    assert len(gcloud) == 6
    assert all(option(c, "project") == "my-proj" for c in gcloud)


def test_tpu_git_clone_and_options(env, tmp_path):
    cmds = dry_run(
        "tpu_vm.sh",
        "--name=pod",
        f"--zone={ZONE}",
        "--accelerator-type=v4-32",
        "--version=tpu-vm-v4-base",
        "--repo=https://example.com/x/extkd_jax.git",
        "--ref=v1.0",
        "--command",
        "extkd distill --config=configs/cifar10.py --config.name='a b'",
        "--workdir=gs://bucket/runs/1",
        f"--local-results={tmp_path / 'res'}",
        env=env,
    )
    assert not any(c[0] == "tar" or (is_gcloud("scp")(c) and "--worker=all" in c) for c in cmds)
    (create,) = [c for c in cmds if is_gcloud("create")(c)]
    assert "--accelerator-type=v4-32" in create and "--version=tpu-vm-v4-base" in create
    install, launch = [option(c, "command") for c in cmds if is_gcloud("ssh")(c)]
    assert "git clone https://example.com/x/extkd_jax.git ~/extkd_jax" in install
    assert "checkout v1.0" in install
    assert (
        "extkd distill --config=configs/cifar10.py --config.name='a b' --workdir=gs://bucket/runs/1 "
        "--config.distributed.enabled=True"
    ) in launch
    assert cmds[-1] == ["gcloud", "storage", "cp", "--recursive", "gs://bucket/runs/1", str(tmp_path / "res")]


def test_tpu_distributed_flag_not_repeated(env):
    cmds = dry_run(
        "tpu_vm.sh",
        "--name=kd",
        f"--zone={ZONE}",
        "--command=extkd train --config=configs/c.py --config.distributed.enabled=True",
        env=env,
    )
    launch = option([c for c in cmds if is_gcloud("ssh")(c)][-1], "command")
    assert launch.count("--config.distributed.enabled=True") == 1


def test_tpu_multi_host_local_workdir_warns(env):
    res = run("tpu_vm.sh", "--name=kd", f"--zone={ZONE}", "--accelerator-type=v4-32", "--dry-run", env=env)
    assert res.returncode == 0 and "use a gs:// workdir" in res.stderr
    res = run("tpu_vm.sh", "--name=kd", f"--zone={ZONE}", "--dry-run", env=env)
    assert res.returncode == 0 and res.stderr == ""


def test_tpu_real_run_matches_dry_run(env, tmp_path):
    args = ["--name=kd", f"--zone={ZONE}", "--spot", "--delete", f"--local-results={tmp_path / 'res'}"]
    planned = [c for c in dry_run("tpu_vm.sh", *args, env=env) if c[0] == "gcloud"]
    res = run("tpu_vm.sh", *args, env=env)
    assert res.returncode == 0, res.stderr
    assert [["gcloud"] + call["argv"] for call in stub_calls(env)] == planned
    assert (tmp_path / "res").is_dir()
    assert not list(tmp_path.glob("extkd_jax-*.tar.gz")), "the tarball is removed after the copy"


@pytest.mark.parametrize("delete", [True, False])
def test_tpu_failed_run_deletes_only_with_delete(env, tmp_path, delete):
    env["STUB_FAIL_RE"] = r"tpu-vm ssh .*extkd reproduce"
    args = ["--name=kd", f"--zone={ZONE}", "--skip-install", f"--local-results={tmp_path / 'res'}"]
    res = run("tpu_vm.sh", *args, *(["--delete"] if delete else []), env=env)
    assert res.returncode == 3
    subcommands = [call["argv"][3] for call in stub_calls(env)]
    assert subcommands == (["create", "ssh", "delete"] if delete else ["create", "ssh"])


# ---------------------------------------------------------------- gpu.sh


def test_gpu_dry_run(env):
    cmds = dry_run("gpu.sh", env=env)
    assert cmds == [
        ["nvidia-smi", "-L"],
        ["cd", str(REPO_ROOT)],
        [
            "env",
            "XLA_PYTHON_CLIENT_MEM_FRACTION=.9",
            "extkd",
            "reproduce",
            "--config=cifar10_drop",
            "--workdir=/tmp/extkd_run",
        ],
    ]


def test_gpu_dry_run_venv_install_and_options(env, tmp_path):
    cmds = dry_run(
        "gpu.sh",
        "--venv",
        "venv",
        "--mem-fraction=0.5",
        "--workdir=runs/a",
        "--command=extkd train --config=configs/c.py --config.name='x y'",
        env=env,
    )
    venv = tmp_path / "venv"
    assert cmds[0] == ["nvidia-smi", "-L"]
    assert ["python3", "-m", "venv", str(venv)] in cmds
    assert [str(venv / "bin/python"), "-m", "pip", "install", "-e", f"{REPO_ROOT}[all]", "jax[cuda12]"] in cmds
    assert cmds[-2][:2] == ["export", f"VIRTUAL_ENV={venv}"]
    assert cmds[-1] == [
        "env",
        "XLA_PYTHON_CLIENT_MEM_FRACTION=0.5",
        "extkd",
        "train",
        "--config=configs/c.py",
        "--config.name=x y",
        f"--workdir={tmp_path / 'runs/a'}",
    ]

    cmds = dry_run("gpu.sh", "--install", "--jax-extra=none", env=env)
    assert ["python3", "-m", "pip", "install", "-e", f"{REPO_ROOT}[all]"] in cmds


def test_gpu_bad_values(env):
    assert_failed(
        run("gpu.sh", "--mem-fraction=1.5", "--dry-run", env=env),
        "--mem-fraction must be a number in (0, 1], got '1.5'",
    )
    assert_failed(
        run("gpu.sh", "--command", "extkd 'oops", "--dry-run", env=env),
        "cannot split --command into words: xargs: unmatched single quote",
    )
    assert_failed(run("gpu.sh", "--dry-run", "--workdir", env=env), "--workdir needs a value")


def test_gpu_real_run_with_stubs(env, tmp_path):
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = ".7"
    res = run("gpu.sh", "--workdir=out", "--command=extkd evaluate --config=configs/c.py --config.name='p q'", env=env)
    assert res.returncode == 0, res.stderr
    smi, extkd = stub_calls(env)
    assert smi["name"] == "nvidia-smi" and smi["argv"] == ["-L"]
    assert extkd["name"] == "extkd"
    assert extkd["argv"] == ["evaluate", "--config=configs/c.py", "--config.name=p q", f"--workdir={tmp_path / 'out'}"]
    assert extkd["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == ".7"
    assert pathlib.Path(extkd["cwd"]) == REPO_ROOT


# ---------------------------------------------------------------- local_cpu.sh


def test_local_cpu_dry_run(env):
    cmds = dry_run("local_cpu.sh", env=env)
    assert cmds == [
        ["cd", str(REPO_ROOT)],
        ["python3", "-m", "pip", "install", "-e", f"{REPO_ROOT}[all]"],
        ["env", "JAX_PLATFORMS=cpu", "extkd", "reproduce", "--config=smoke", "--workdir=/tmp/extkd_smoke"],
    ]
    env["WORKDIR"] = "/tmp/elsewhere"
    cmds = dry_run("local_cpu.sh", "--no-install", env=env)
    assert cmds == [
        ["cd", str(REPO_ROOT)],
        ["env", "JAX_PLATFORMS=cpu", "extkd", "reproduce", "--config=smoke", "--workdir=/tmp/elsewhere"],
    ]


def test_local_cpu_real_run_with_stubs(env, tmp_path):
    res = run("local_cpu.sh", "--no-install", f"--workdir={tmp_path / 'w'}", env=env)
    assert res.returncode == 0, res.stderr
    (call,) = stub_calls(env)
    assert call["name"] == "extkd"
    assert call["argv"] == ["reproduce", "--config=smoke", f"--workdir={tmp_path / 'w'}"]
    assert call["env"]["JAX_PLATFORMS"] == "cpu"
    assert pathlib.Path(call["cwd"]) == REPO_ROOT


# ---------------------------------------------------------------- all scripts


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_syntax(env, script):
    res = run(script, "--help", env=env)
    assert res.returncode == 0 and "Usage:" in res.stdout and "--dry-run" in res.stdout
    assert subprocess.run([BASH, "-n", str(LAUNCH / script)]).returncode == 0
    assert os.access(LAUNCH / script, os.X_OK)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck():
    res = subprocess.run(["shellcheck", "-x", *SCRIPTS, "_common.sh"], cwd=LAUNCH, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout
