#!/usr/bin/env python3
"""The paper's experiment at its own scale (`cifar10_drop`: resnet56 teacher on all of CIFAR-10, resnet20 students on
the transfer set without cats, the preset's recipe, grids and seeds) in one call to a lent accelerator.

    python benchmarks/paper_scale.py [--cpu] [--variant drop|two] [--methods M,M,...] [--seeds N] [--no-grid]
        [--grid METHOD=V,V...]... [--teacher TGZ] [--wheelhouse DIR] [--data DIR] [--out DIR] [--budget S]
        [--workers N] [--mps]

Phases, each under its own time limit inside the overall --budget (default 540 s; --cpu 300 s):
1. install: the wheelhouse (benchmarks/make_wheelhouse.sh) into a private site dir (the device image lacks
   ml_collections); the checkout's package comes first on the path, laid out as the wheel lays it out;
2. teacher: `extkd train --config=cifar10_drop[:two],teacher` (or --teacher: a teacher.tgz of an earlier call);
3. students: launch/parallel_reproduce.py, one `extkd reproduce` process per method on the one GPU, every job
   starting with a copy of the teacher, stopped at the students' deadline (the budget less the report's reserve);
4. report: the launcher's `extkd reproduce` over the finished runs (results.json, report.md), in the reserve.
A phase that fails or runs out of time does not stop the others; the summary names every method left out and why.

Writes at most 7 files under --out ($OUT by default): paper_scale.log, paper_scale.json (phases: status, limit and
seconds; each method reported or left out, and why; the launcher's jobs), report.md (this call's phases and
left-outs, then the experiment's report when one was written), results.json, <experiment>.tgz (report, plots,
configs, every run's metrics; no checkpoints), part_logs.tgz and teacher.tgz (the trained teacher with its last
checkpoint only, for --teacher in a later call: the `two` variant's teacher is the same run).
--cpu runs the same phases on a synthetic CIFAR-shaped set with the preset's `mini` sizes (MLPs, 1-2 epochs).
Exit status: 0 when every method is reported, 3 when some are left out, 1 when none is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from gpu_mps import start_mps, stop_mps  # noqa: E402

METHODS = ("scratch_full", "scratch_transfer", "kd", "fitnet", "extended_kd")
NO_TEACHER = ("scratch_full", "scratch_transfer")  # trained without one (but scored against it)
BUDGETS = {  # seconds per phase (device, cpu); each is also cut to what the overall budget leaves
    "install": (60, 20),
    "teacher": (170, 60),
    "report": (90, 40),
}
MIN_STUDENTS = 30  # seconds the students need at least (--cpu: a third of it); less left: the phase is skipped


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="the rehearsal: synthetic data, the preset's `mini` sizes")
    p.add_argument("--variant", choices=("drop", "two"), default="drop", help="two: cat and dog dropped")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated `extkd reproduce` methods")
    p.add_argument("--seeds", type=int, default=3, help="reported seeds per method (the preset's 3)")
    p.add_argument("--no-grid", action="store_true", help="every knob at its configured value: no selection runs")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="METHOD=V,V",
        help="a method's knob grid instead of the preset's; one value: no selection runs (e.g. kd=4, the reference T)",
    )
    p.add_argument("--teacher", type=Path, help="teacher.tgz of an earlier call (same sizes): skips its training")
    p.add_argument("--wheelhouse", type=Path, help="wheels to install first (benchmarks/make_wheelhouse.sh)")
    p.add_argument("--data", type=Path, default=Path("/root/data"), help="the CIFAR-10 npz folder (not --cpu)")
    p.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    p.add_argument("--budget", type=float, help="seconds for the whole call (default 540; --cpu 300)")
    p.add_argument("--teacher-budget", type=float, help="seconds for the teacher phase (default 170; --cpu 60)")
    p.add_argument("--report-budget", type=float, help="seconds kept for the report (default 90; --cpu 40)")
    p.add_argument("--workers", type=int, help="student processes at a time (default 12; --cpu 3)")
    p.add_argument("--override", action="append", default=[], help="a --config.KEY=VALUE flag for every run")
    p.add_argument("--mps", action="store_true", help="students under CUDA MPS (checked first; off if it fails)")
    args = p.parse_args(argv)
    args.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if not args.methods:
        p.error("--methods: expected at least one method")
    if args.seeds < 1:
        p.error(f"--seeds={args.seeds}: expected at least 1")
    grids = {}
    for spec in args.grid:
        method, _, values = spec.partition("=")
        try:
            grids[method] = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError:
            grids[method] = ()
        if method not in args.methods or not grids[method]:
            p.error(f"--grid={spec!r}: expected METHOD=V[,V...] with METHOD among --methods {args.methods}")
    args.grid = grids
    if args.teacher is not None and not args.teacher.is_file():
        p.error(f"--teacher={args.teacher}: no such file (expected the teacher.tgz of an earlier call)")
    k = 1 if args.cpu else 0
    args.budget = args.budget or (300.0 if args.cpu else 540.0)
    args.teacher_budget = args.teacher_budget or BUDGETS["teacher"][k]
    args.report_budget = args.report_budget or BUDGETS["report"][k]
    args.workers = args.workers or (3 if args.cpu else 12)
    return args


class Call:
    """The call's clock, log and phase records: each phase is limited to its budget and to what is left."""

    def __init__(self, args: argparse.Namespace, out: Path):
        self.start, self.budget, self.out = time.time(), args.budget, out
        self.log_path = out / "paper_scale.log"
        self.phases: dict[str, dict] = {}

    def left(self) -> float:
        return self.budget - (time.time() - self.start)

    def say(self, message: str) -> None:
        line = f"[paper_scale {time.time() - self.start:.0f}s] {message}"
        print(line, flush=True)
        with open(self.log_path, "a") as log:
            log.write(line + "\n")

    def limit(self, name: str, budget: float, keep: float) -> float:
        """min(budget, time left - keep); under 1 s the phase is recorded as skipped and 0 returned."""
        limit = min(budget, self.left() - keep)
        if limit < 1:
            self.phases[name] = {"status": "skipped: out of time", "limit_s": 0, "seconds": 0}
            self.say(f"{name}: skipped (out of time)")
            return 0.0
        return limit

    def run(self, name: str, cmd: list[str], limit: float, env: dict, cwd: Path | None = None) -> bool:
        """Runs `cmd` under `limit` seconds (killed after it), output appended to the log; True when it exits 0."""
        self.say(f"{name}: start (limit {limit:.0f}s): {' '.join(map(str, cmd))}")
        t0 = time.time()
        with open(self.log_path, "a") as log:
            # its own process group: at the limit the launcher's student processes are stopped with it
            process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
            )
            try:
                rc = process.wait(timeout=limit)
                status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                status = f"timed out after {limit:.0f}s"
        self.record(name, status, limit, time.time() - t0)
        return status == "ok"

    def record(self, name: str, status: str, limit: float, seconds: float) -> None:
        self.phases[name] = {"status": status, "limit_s": round(limit, 1), "seconds": round(seconds, 1)}
        self.say(f"{name}: {status} in {seconds:.0f}s")


def preset_and_overrides(args: argparse.Namespace, data: Path) -> tuple[str, list[str]]:
    """The experiment's preset[:variants] and the --config flags every run of it gets."""
    variants = [v for v in ("mini" if args.cpu else "", "two" if args.variant == "two" else "") if v]
    preset = "cifar10_drop" + (":" + ",".join(variants) if variants else "")
    listed = "(" + "".join(f"'{m}'," for m in args.methods) + ")"
    flags = [f"--config.data.dir={data}", "--config.progress=False", f"--config.seeds={args.seeds}"]
    flags.append(f"--config.reproduce.methods={listed}")
    if args.no_grid:
        flags += [f"--config.reproduce.grid.{m}=()" for m in args.methods if m not in (*NO_TEACHER, *args.grid)]
    for method, values in args.grid.items():
        flags.append(f"--config.reproduce.grid.{method}=(" + "".join(f"{v!r}," for v in values) + ")")
    return preset, flags + list(args.override)


def environment(args: argparse.Namespace, call: Call, work: Path) -> dict:
    """The runs' environment: the checkout's package first, the wheelhouse's dependencies after it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_COMPILATION_CACHE_DIR": str(work / "xla_cache")}
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # the teacher, then many students share the one GPU
    if args.cpu:
        env["JAX_PLATFORMS"] = "cpu"
    paths = [str(work / "src")]
    shutil.copytree(REPO / "extkd_jax", work / "src" / "extkd_jax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "configs", work / "src" / "extkd_jax" / "configs")
    if args.wheelhouse is not None:
        limit = call.limit("install", BUDGETS["install"][int(args.cpu)], keep=0)
        wheels = sorted(str(w) for w in args.wheelhouse.glob("*.whl"))
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        if limit and wheels:
            call.run("install", [*pip, "--target", str(work / "site"), *wheels], limit, env)
        elif not wheels:
            call.record("install", f"failed: no wheels in {args.wheelhouse}", 0, 0)
        paths.append(str(work / "site"))
    env["PYTHONPATH"] = os.pathsep.join(paths + [env["PYTHONPATH"]] if env.get("PYTHONPATH") else paths)
    return env


def teacher_phase(args, call: Call, env: dict, preset: str, flags: list[str], work: Path) -> Path | None:
    """The teacher run's workdir once finished (trained here or unpacked from --teacher), else None."""
    teacher = work / "teacher"
    if args.teacher is not None:
        t0 = time.time()
        with tarfile.open(args.teacher) as tar:
            tar.extractall(work, filter="data")
        ok = (teacher / "config.json").is_file()
        status = f"carried from {args.teacher}" if ok else f"failed: no teacher/config.json in {args.teacher}"
        call.record("teacher", status, 0, time.time() - t0)
        return teacher if ok else None
    keep = args.report_budget + MIN_STUDENTS / (3 if args.cpu else 1)  # the students' and the report's time
    limit = call.limit("teacher", args.teacher_budget, keep=keep)
    if not limit:
        return None
    role = preset + ("," if ":" in preset else ":") + "teacher"
    cmd = [sys.executable, "-m", "extkd_jax.cli", "train", f"--config={role}", *flags, f"--workdir={teacher}"]
    return teacher if call.run("teacher", cmd, limit, env, cwd=Path("/tmp")) else None


def students_phase(args, call: Call, env: dict, preset: str, flags: list[str], work: Path, teacher: Path | None):
    """The launcher over the methods that can run (all with a teacher); its report is the `report` phase."""
    if teacher is None:  # every student is scored against the teacher (the correction): nothing can be reported
        call.phases["students"] = {"status": "skipped: no teacher", "limit_s": 0, "seconds": 0}
        call.say("students: skipped (no teacher: every student is scored against it)")
        return None
    deadline = call.limit("students", call.left() - args.report_budget, keep=0)
    if not deadline:
        return None
    cmd = [sys.executable, str(REPO / "launch/parallel_reproduce.py"), f"--workdir={work / 'exp'}"]
    cmd += [f"--workers={args.workers}", f"--deadline={deadline:.0f}", f"--teacher-from={teacher}"]
    cmd += [f"--experiment={experiment_name(args)}={preset}", "--", *flags]
    t0 = time.time()
    call.run("students", cmd, deadline + args.report_budget, env, cwd=Path("/tmp"))
    summary_path = work / "exp" / "parallel_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    if summary is not None:  # the launcher's jobs, then its report: two phases
        jobs_s = max((j["seconds"] for j in summary["jobs"].values()), default=0.0)
        report = summary["reports"].get(experiment_name(args), {})
        done = sum(j["exit"] in (0, 3) for j in summary["jobs"].values())
        status = "ok" if done == len(summary["jobs"]) else f"{done} of {len(summary['jobs'])} jobs finished"
        call.phases["students"] = {"status": status, "limit_s": round(deadline, 1), "seconds": round(jobs_s, 1)}
        call.phases["students"]["jobs"] = summary["jobs"]
        status = "ok" if report.get("exit") == 0 else f"exit {report.get('exit')}"
        call.record("report", status, args.report_budget, report.get("seconds", time.time() - t0 - jobs_s))
    return summary


def experiment_name(args) -> str:
    return "cifar10_drop" + ("_two" if args.variant == "two" else "") + ("_mini" if args.cpu else "")


def methods_report(args, call: Call, teacher: Path | None, summary: dict | None, results: dict | None) -> dict:
    """Each method reported (corrected test accuracy and on the dropped classes, mean over seeds) or left out, why."""
    reported, left_out = {}, {}
    for method, result in (results or {}).get("methods", {}).items():
        runs = result["runs"]
        reported[method] = {
            key: round(sum(r[key] for r in runs) / len(runs), 4)
            for key in ("test_acc_corrected", "unseen_acc_corrected")
        }
        reported[method]["seeds"] = len(runs)
    for method in args.methods:
        if method in reported:
            continue
        if teacher is None:
            left_out[method] = f"no teacher (teacher phase: {call.phases.get('teacher', {}).get('status')})"
        elif summary is None:
            left_out[method] = f"students phase: {call.phases.get('students', {}).get('status', 'not run')}"
        elif results and method in results.get("diverged", {}):
            left_out[method] = f"diverged: {results['diverged'][method]}"
        else:
            jobs = [j for j in summary["jobs"].values() if j["method"] == method]
            why = [
                f"stopped at the students' deadline after {j['seconds']:.0f}s"
                if j["exit"] == -9
                else f"its job exited {j['exit']} after {j['seconds']:.0f}s (part_logs.tgz)"
                for j in jobs
            ]
            left_out[method] = "; ".join(why) or "no job"
    return {"reported": reported, "left_out": left_out}


def call_section(record: dict) -> str:
    """The head of report.md: this call's phases and every method left out, named."""
    wall, budget = record["wall_s"], record["budget_s"]
    lines = [f"# This call: {record['experiment']} ({record['platform']}, {wall:.0f} s of {budget:.0f})"]
    lines += ["", f"`{record['command']}`", "", "| phase | status | limit (s) | seconds |", "|---|---|---:|---:|"]
    for name, phase in record["phases"].items():
        lines.append(f"| {name} | {phase['status']} | {phase['limit_s']:.0f} | {phase['seconds']:.0f} |")
    reported, left_out = record["methods"]["reported"], record["methods"]["left_out"]
    lines += ["", f"Reported: {', '.join(reported) or 'none'}."]
    lines += [
        f"Left out: {', '.join(f'**{m}** ({why})' for m, why in left_out.items())}." if left_out else "Left out: none."
    ]
    return "\n".join(lines) + "\n\n"


def collect(args, call: Call, work: Path, teacher: Path | None, summary: dict | None) -> dict:
    """Writes what comes back under --out (at most 8 files): paper_scale.json, report.md, results.json, the tgz's."""
    name, out = experiment_name(args), call.out
    exp = work / "exp" / name
    results = json.loads((exp / "results.json").read_text()) if (exp / "results.json").is_file() else None
    if results is not None:
        shutil.copy(exp / "results.json", out / "results.json")
    skip = ("checkpoints", "tensorboard", ".lock")
    if exp.is_dir():
        with tarfile.open(out / f"{name}.tgz", "w:gz") as tar:
            tar.add(exp, arcname=name, filter=lambda t: None if Path(t.name).name in skip else t)
    parts = sorted((work / "exp" / "parts").glob("*/part.log"))
    if parts:
        with tarfile.open(out / "part_logs.tgz", "w:gz") as tar:
            for log in parts:
                tar.add(log, arcname=f"{log.parent.name}.log")
    if teacher is not None and args.teacher is None:
        pack_teacher(teacher, out / "teacher.tgz")
    record = {
        "experiment": name,
        "platform": "cpu" if args.cpu else "accelerator",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "budget_s": args.budget,
        "wall_s": round(time.time() - call.start, 1),
        "seeds": args.seeds,
        "phases": call.phases,
        "methods": methods_report(args, call, teacher, summary, results),
        "hardware": (results or {}).get("hardware"),
        "launcher": summary,
    }
    (out / "paper_scale.json").write_text(json.dumps(record, indent=2))
    report = (exp / "report.md").read_text() if (exp / "report.md").is_file() else ""
    (out / "report.md").write_text(call_section(record) + report)
    return record


def pack_teacher(teacher: Path, target: Path) -> None:
    """The teacher run with its last checkpoint only (what a student needs), for --teacher in a later call."""
    steps = sorted(int(p.name) for p in (teacher / "checkpoints").glob("[0-9]*"))
    if not steps:
        return

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        if len(parts) > 1 and parts[1] in ("tensorboard", ".lock"):
            return None
        if len(parts) > 2 and parts[1] == "checkpoints" and parts[2] != str(steps[-1]):
            return None
        return info

    with tarfile.open(target, "w:gz") as tar:
        tar.add(teacher, arcname="teacher", filter=keep)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="extkd_paper_scale."))
    out.mkdir(parents=True, exist_ok=True)
    call = Call(args, out)
    work = Path(tempfile.mkdtemp(prefix="extkd_ps_work."))
    try:
        call.say(f"out={out} work={work} methods={','.join(args.methods)} seeds={args.seeds} budget={args.budget}s")
        env = environment(args, call, work)
        data = args.data
        if args.cpu:
            from synthetic_cifar import write

            data = write(work / "data", 1000, 200)
        elif not (data / "test.npz").is_file():
            call.say(f"no CIFAR-10 in {data} (test.npz missing): see benchmarks/README.md, moving CIFAR-10")
        preset, flags = preset_and_overrides(args, data)
        teacher = teacher_phase(args, call, env, preset, flags, work)
        mps_env = start_mps(call, env, work) if args.mps and teacher is not None else None
        summary = students_phase(args, call, mps_env or env, preset, flags, work, teacher)
        if mps_env is not None:
            stop_mps(mps_env)
        record = collect(args, call, work, teacher, summary)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    call.say(f"reported {record['methods']['reported']}; left out {record['methods']['left_out'] or 'none'}")
    print(json.dumps({"experiment": record["experiment"], "wall_s": record["wall_s"], **record["methods"]}))
    if not record["methods"]["reported"]:
        return 1
    return 3 if record["methods"]["left_out"] else 0


if __name__ == "__main__":
    sys.exit(main())
