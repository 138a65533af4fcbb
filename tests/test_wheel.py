"""The package as a user gets it: the wheel built from this checkout, installed into a fresh virtualenv, run from a
directory outside the repository (presets inside the package, every subcommand's help, the smoke experiment, the
public loader)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from extkd_jax.cli import COMMANDS
from tests.tiny import REPO_ROOT, build_wheel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A virtualenv holding only the wheel; the dependencies come from this interpreter's site-packages."""
    root = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(root / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    for module in (
        "extkd_jax/train/loop.py",
        "extkd_jax/configs/cifar10_drop.py",
        "extkd_jax/configs/base.py",
        "extkd_jax/losses/__init__.py",
        "extkd_jax/py.typed",
    ):
        assert module in names, f"{module} missing from the wheel"
    assert not any(n.startswith(("tests/", "configs/", "benchmarks/")) for n in names)
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    # the dependencies: this interpreter's site-packages, after the venv's own (so the wheel's extkd_jax wins; the
    # .pth files there, such as an editable install of this checkout, are not read). Not --system-site-packages:
    # from inside a venv that is the base Python's, without jax.
    (site,) = (root / "venv" / "lib").glob("python*/site-packages")
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "dependencies.pth").write_text("".join(f"{path}\n" for path in deps))
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    outside = root / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JAX_PLATFORMS")}
    return {"python": python, "extkd": root / "venv" / "bin" / "extkd", "cwd": outside, "env": env}


def _run(venv, *args, timeout=600):
    return subprocess.run(
        [str(a) for a in args], cwd=venv["cwd"], env=venv["env"], capture_output=True, text=True, timeout=timeout
    )


def test_the_installed_package_is_the_wheel(venv):
    where = _run(
        venv, venv["python"], "-c", "import extkd_jax, extkd_jax.configs as c; print(extkd_jax.__file__, c.__file__)"
    )
    assert where.returncode == 0, where.stderr
    assert all("/venv/" in path and str(REPO_ROOT) not in path for path in where.stdout.split())


def test_version_and_help_of_every_subcommand(venv):
    version = _run(venv, venv["extkd"], "--version")
    assert version.returncode == 0 and version.stdout.startswith("extkd_jax ")
    for command in COMMANDS:
        out = _run(venv, venv["extkd"], command, "--help")
        assert out.returncode == 0, out.stderr
        assert f"usage: extkd {command}" in out.stdout and "presets: cifar10_drop, digits_omit3" in out.stdout
        assert "__init__" not in out.stdout and "base," not in out.stdout


def test_smoke_experiment_and_the_loader_from_outside_the_repository(venv):
    workdir = venv["cwd"] / "smoke"
    out = _run(venv, venv["extkd"], "reproduce", "--config=smoke", f"--workdir={workdir}", timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (workdir / "report.md").exists() and (workdir / "results.json").exists()
    check = _run(
        venv,
        venv["python"],
        "-c",
        f"""
import json, extkd_jax
from sklearn.datasets import load_digits
model = extkd_jax.load({str(workdir / "runs/kd/seed_0")!r})
digits = load_digits()
images = (digits.images[1200:] * 255 // 16).astype("uint8")[..., None]
logits = model(images)
print(json.dumps({{"shape": list(logits.shape), "acc": float((logits.argmax(1) == digits.target[1200:]).mean())}}))
""",
    )
    assert check.returncode == 0, check.stderr[-3000:]
    result = json.loads(check.stdout.strip().splitlines()[-1])
    evaluated = json.loads((workdir / "runs/kd/seed_0/metrics.jsonl").read_text().splitlines()[-1])
    assert result["shape"] == [597, 10]
    assert result["acc"] == pytest.approx(evaluated["test_acc"], abs=1e-9)  # the loader agrees with the run
    # the README's table of the experiment, from its results.json
    table = _run(venv, venv["extkd"], "report", f"--workdir={workdir}")
    assert table.returncode == 0, table.stderr[-3000:]
    rows = {line.split(" | ")[0].strip("| ") for line in table.stdout.splitlines()[2:] if line.startswith("| ")}
    stored = json.loads((workdir / "results.json").read_text())
    assert {row.split(" (")[0] for row in rows} == set(stored["methods"])
