"""The launch scripts (launch/*.sh): dry-run output, flag errors, and real runs against stub commands.

Nothing here needs gcloud, a GPU or the network: the scripts run under `bash` with a PATH whose first entry holds
stub `gcloud`, `nvidia-smi` and `extkd` programs that only log how they were called and print what STUB_OUTPUTS
gives them (by default: a TPU VM that is READY and a job whose status is 0). tests/test_pod_rehearsal.py runs the
worker command tpu_vm.sh prints.
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

# STUB_OUTPUTS: JSON [[REGEX, [OUT1, OUT2, ...]], ...]: the n-th call whose command line matches REGEX prints
# OUTn (the last one again once they run out).
_STUB = """#!{python}
import json, os, re, sys
name = os.path.basename(sys.argv[0])
line = " ".join([name] + sys.argv[1:])
log = os.environ["STUB_LOG"]
earlier = [" ".join([e["name"]] + e["argv"]) for e in map(json.loads, open(log))] if os.path.exists(log) else []
for regex, outputs in json.loads(os.environ.get("STUB_OUTPUTS", "[]")):
    if re.search(regex, line):
        print(outputs[min(sum(1 for e in earlier if re.search(regex, e)), len(outputs) - 1)])
        break
entry = {{"name": name, "argv": sys.argv[1:], "cwd": os.getcwd(),
          "env": {{k: os.environ.get(k) for k in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "JAX_PLATFORMS")}}}}
with open(log, "a") as f:
    f.write(json.dumps(entry) + "\\n")
fail = os.environ.get("STUB_FAIL_RE")
sys.exit(3 if fail and re.search(fail, line) else 0)
"""
DESCRIBE_RE = r"tpu-vm describe"
STATUS_RE = r"tpu-vm ssh .*--worker=0 --command=cat"


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
    e["EXTKD_DATA_DIR"] = str(tmp_path / "data")  # gpu.sh notes its absence
    e["PATH"] = f"{stubs}{os.pathsep}{e.get('PATH', '')}"
    e["STUB_LOG"] = str(tmp_path / "stub_log.jsonl")
    e["STUB_OUTPUTS"] = json.dumps([[DESCRIBE_RE, ["READY"]], [STATUS_RE, ["0"]]])
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
    assert len(ssh) == 3, cmds
    install, launch, status = ssh
    describe = find(cmds, is_gcloud("describe"), "describe")
    fetch = find(cmds, lambda c: is_gcloud("scp")(c) and "--worker=0" in c, "scp back")
    delete = find(cmds, is_gcloud("delete"), "delete")
    assert create < scp_code < install < launch < describe < status < fetch < delete == len(cmds) - 1

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
    # detached in its own session, logging per worker, the log copied into the workdir, then the exit status
    assert "nohup setsid bash -c " in run_cmd and run_cmd.endswith('echo "worker $W: started; log $L/worker-$W.log"')
    assert "L=~/extkd_logs/kd-v4;" in run_cmd and '"$@" > "$L/worker-$W.log" 2>&1' in run_cmd
    assert 'cp "$L/worker-$W.log" "$D/logs/"' in run_cmd and 'echo $s > "$L/status"' in run_cmd
    assert (
        "extkd-job $L $W /tmp/extkd_run extkd reproduce --config=cifar10_drop --workdir=/tmp/extkd_run "
        "--config.distributed.enabled=True > /dev/null 2>&1 < /dev/null &"
    ) in run_cmd
    assert cmds[describe] == GCLOUD_TPU + ["describe", "kd-v4", f"--zone={ZONE}", "--format=value(state)"]
    assert cmds[status][5:] == [
        "kd-v4",
        f"--zone={ZONE}",
        "--worker=0",
        "--command=cat ~/extkd_logs/kd-v4/status 2>/dev/null || true",
    ]

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


def test_tpu_data_flag_and_the_prepare_step(env):
    cmds = dry_run("tpu_vm.sh", "--name=kd", f"--zone={ZONE}", "--data=gs://b/data", env=env)
    launch = option([c for c in cmds if is_gcloud("ssh")(c)][1], "command")
    assert "--workdir=/tmp/extkd_run --config.data.dir=gs://b/data --config.distributed.enabled=True" in launch
    res = run("tpu_vm.sh", "--name=kd", f"--zone={ZONE}", "--data=gs://b/data", "--dry-run", env=env)
    assert res.stderr == ""
    # without --data: the run line has no data flag, and the note says how to put the data in a bucket
    res = run("tpu_vm.sh", "--name=kd", f"--zone={ZONE}", "--dry-run", env=env)
    assert res.returncode == 0 and "--config.data.dir" not in res.stdout
    assert "extkd data prepare DATASET --out=gs://BUCKET/data" in res.stderr and "--data=gs://BUCKET/data" in res.stderr
    assert_failed(
        run("tpu_vm.sh", "--name=kd", f"--zone={ZONE}", "--data=data/x", "--dry-run", env=env),
        "--data must be a gs://bucket/path URL or an absolute path on the workers, got 'data/x'",
    )
    assert_failed(
        run(
            "tpu_vm.sh",
            "--name=kd",
            f"--zone={ZONE}",
            "--command=extkd train --config.data.dir=/d",
            "--dry-run",
            env=env,
        ),
        "--command must not contain --config.data.dir; pass the data with --data",
    )


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
    assert len(gcloud) == 8  # create, scp, install, start, describe, status, scp back, delete
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
        env=env,
    )
    assert not any(c[0] == "tar" or (is_gcloud("scp")(c) and "--worker=all" in c) for c in cmds)
    (create,) = [c for c in cmds if is_gcloud("create")(c)]
    assert "--accelerator-type=v4-32" in create and "--version=tpu-vm-v4-base" in create
    install, launch, _ = [option(c, "command") for c in cmds if is_gcloud("ssh")(c)]
    assert "git clone https://example.com/x/extkd_jax.git ~/extkd_jax" in install
    assert "checkout v1.0" in install
    assert (
        "extkd distill --config=configs/cifar10.py --config.name='a b' --workdir=gs://bucket/runs/1 "
        "--config.distributed.enabled=True"
    ) in launch
    assert 'gcloud storage cp "$L/worker-$W.log" "$D/logs/worker-$W.log"' in launch  # the job copies its log there
    # a gs:// workdir is not copied back: the last command is the check of the job's status
    assert is_gcloud("ssh")(cmds[-1]) and "--worker=0" in cmds[-1]
    assert not any(c[:2] == ["gcloud", "storage"] or c[0] == "mkdir" for c in cmds)
    assert_failed(
        run(
            "tpu_vm.sh",
            "--name=kd",
            f"--zone={ZONE}",
            "--workdir=gs://b/r",
            f"--local-results={tmp_path}",
            "--dry-run",
            env=env,
        ),
        "--local-results is only for a local --workdir: a gs:// workdir ('gs://b/r') is not copied back",
    )


def test_tpu_distributed_flag_not_repeated(env):
    cmds = dry_run(
        "tpu_vm.sh",
        "--name=kd",
        f"--zone={ZONE}",
        "--command=extkd train --config=configs/c.py --config.distributed.enabled=True",
        env=env,
    )
    launch = option([c for c in cmds if is_gcloud("ssh")(c) and "--worker=all" in c][-1], "command")
    assert launch.count("--config.distributed.enabled=True") == 1


def test_tpu_multi_host_local_workdir_refused(env):
    res = run("tpu_vm.sh", "--name=kd", f"--zone={ZONE}", "--accelerator-type=v4-32", "--dry-run", env=env)
    assert_failed(
        res,
        "--workdir '/tmp/extkd_run' is on each host's own disk, but v4-32 has several hosts: use "
        "--workdir=gs://BUCKET/PATH",
    )
    res = run("tpu_vm.sh", "--name=kd", f"--zone={ZONE}", "--data=/d", "--dry-run", env=env)  # one host: fine
    assert res.returncode == 0 and res.stderr == ""
    assert_failed(
        run("tpu_vm.sh", "--name=kd", f"--zone={ZONE}", "--relaunch=2", "--dry-run", env=env),
        "--relaunch=2 needs a gs:// --workdir to resume from",
    )
    for flag, message in [
        ("--relaunch=-1", "--relaunch must be a whole number of relaunches (0 or more), got '-1'"),
        ("--poll=soon", "--poll must be a whole number of seconds, got 'soon'"),
    ]:
        assert_failed(run("tpu_vm.sh", "--name=kd", f"--zone={ZONE}", flag, "--dry-run", env=env), message)


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


def tpu_steps(env) -> list[str]:
    """The gcloud subcommands the stubs saw: create, scp, ssh, describe, delete."""
    return [call["argv"][3] for call in stub_calls(env) if call["argv"][:3] == ["compute", "tpus", "tpu-vm"]]


POD = ["--name=kd", f"--zone={ZONE}", "--spot", "--workdir=gs://b/run", "--data=gs://b/data", "--poll=0"]


def test_tpu_relaunches_after_a_preemption_and_resumes_the_same_command(env):
    env["STUB_OUTPUTS"] = json.dumps([[DESCRIBE_RE, ["READY", "PREEMPTED", "READY"]], [STATUS_RE, ["", "0"]]])
    res = run("tpu_vm.sh", *POD, "--relaunch=2", "--delete", env=env)
    assert res.returncode == 0, res.stderr
    assert tpu_steps(env) == [
        *["create", "scp", "ssh", "ssh"],  # create, install, start
        *["describe", "ssh", "describe"],  # running (no status yet), then PREEMPTED
        *["delete", "create", "scp", "ssh", "ssh"],  # relaunch 1: a new VM, the code, the same command
        *["describe", "ssh", "delete"],  # done (status 0): nothing copied back from gs://, VM deleted
    ]
    starts = [c["argv"] for c in stub_calls(env) if "nohup setsid" in " ".join(c["argv"])]
    assert len(starts) == 2 and starts[0] == starts[1]
    assert "is down (state PREEMPTED): relaunch 1 of 2" in res.stderr and "resuming from the checkpoints" in res.stderr


def test_tpu_a_job_stopped_by_sigterm_counts_as_preempted(env):
    """The job exits (1) on the preemption's SIGTERM before the VM leaves READY: the script looks again."""
    env["STUB_OUTPUTS"] = json.dumps([[DESCRIBE_RE, ["READY", "STOPPING", "READY"]], [STATUS_RE, ["1", "0"]]])
    res = run("tpu_vm.sh", *POD, "--relaunch=1", "--skip-install", env=env)
    assert res.returncode == 0, res.stderr
    assert tpu_steps(env)[:5] == ["create", "ssh", "describe", "ssh", "describe"]
    assert tpu_steps(env)[5:7] == ["delete", "create"] and "state STOPPING" in res.stderr


def test_tpu_preempted_without_relaunch_stops_and_says_how_to_resume(env):
    env["STUB_OUTPUTS"] = json.dumps([[DESCRIBE_RE, ["PREEMPTED"]]])
    res = run("tpu_vm.sh", *POD, "--skip-install", env=env)
    assert res.returncode == 75
    assert tpu_steps(env) == ["create", "ssh", "describe"]
    assert "is down (state PREEMPTED) before the job finished; the checkpoints in gs://b/run are kept" in res.stderr


def test_tpu_failed_job_exits_with_its_status_and_names_the_logs(env):
    env["STUB_OUTPUTS"] = json.dumps([[DESCRIBE_RE, ["READY"]], [STATUS_RE, ["2"]]])
    res = run("tpu_vm.sh", *POD, "--skip-install", "--relaunch=3", env=env)
    assert res.returncode == 2
    assert tpu_steps(env) == ["create", "ssh", "describe", "ssh", "describe"]  # failed, not preempted: no relaunch
    assert "the job failed on worker 0 (exit status 2)" in res.stderr
    assert "tail -n 30 ~/extkd_logs/kd/worker-*.log" in res.stderr


def test_tpu_failed_job_still_copies_a_local_workdir_back_before_deleting(env, tmp_path):
    """Exit 3 (every method diverged) still wrote a report: it comes back before --delete removes the VM."""
    env["STUB_OUTPUTS"] = json.dumps([[DESCRIBE_RE, ["READY"]], [STATUS_RE, ["3"]]])
    args = ["--name=kd", f"--zone={ZONE}", "--skip-install", "--poll=0", "--delete", f"--local-results={tmp_path}"]
    res = run("tpu_vm.sh", *args, env=env)
    assert res.returncode == 3, res.stderr
    assert tpu_steps(env) == ["create", "ssh", "describe", "ssh", "describe", "scp", "delete"]


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


def test_gpu_data_flag(env, tmp_path):
    cmds = dry_run("gpu.sh", "--data=prepared/cifar10", env=env)
    assert cmds[-1][-2:] == ["--workdir=/tmp/extkd_run", f"--config.data.dir={tmp_path / 'prepared/cifar10'}"]
    assert dry_run("gpu.sh", "--data=gs://b/data", env=env)[-1][-1] == "--config.data.dir=gs://b/data"
    del env["EXTKD_DATA_DIR"]
    res = run("gpu.sh", "--dry-run", env=env)
    assert res.returncode == 0 and "--config.data.dir" not in res.stdout
    assert "extkd data prepare DATASET --out=DIR" in res.stderr
    assert_failed(
        run("gpu.sh", "--command=extkd train --config.data.dir=x", "--dry-run", env=env),
        "--command must not contain --config.data.dir; pass the data with --data",
    )


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
