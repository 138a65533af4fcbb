#!/usr/bin/env python3
"""Runs the methods of one or more `extkd reproduce` experiments as parallel processes on one host, then writes
each experiment's report from the finished runs.

Why: the CPU-scale models (resnet8, MLPs) leave an accelerator mostly idle, and an experiment's runs are
independent once its teacher exists. One `extkd reproduce` per method (in its own part workdir) fills the
accelerator and the host's cores; compilation, the main cost of such small runs, happens in parallel.

    python launch/parallel_reproduce.py --workdir=/tmp/cmp --workers=8 \\
        --experiment=zoo=cifar10_drop:cpu,zoo --experiment=conv=cifar10_drop:cpu,conv \\
        -- --config.data.dir=/root/data --config.progress=False

What it does, with W the --workdir:
1. each method of each experiment is a job `extkd reproduce --config.reproduce.methods=(METHOD,)` in
   W/parts/<method>-<key> (a method shared by experiments with the same settings runs once);
2. one job of each teacher trains it, every one of its `reproduce.teacher_seeds` runs (`teacher`, `teacher_1`,
   ...); the other jobs, the scratch students' included (they are scored against it), start with a copy of those
   runs once they are finished, so that no teacher is trained twice;
   (`--teacher-from=DIR`: a finished teacher run, e.g. `extkd train --config=PRESET:teacher`, is copied into every
   job that uses `teacher`, and none waits unless `reproduce.teacher_seeds` asks for more teachers);
   a job whose method runs at KD's chosen temperature (fitnet, extended_kd, dkd, ...: `uses_kd_temperature`)
   also waits until the experiment's kd job has finished its selection runs, and starts with a copy of them, so
   that KD's grid is trained once, not once per such method;
3. each experiment's runs are gathered into W/<name> and `extkd reproduce` is run there on all its methods: every
   run is found finished, so it only scores them and writes the report. Jobs that did not finish by --deadline
   are left out of the report and named in W/parallel_summary.json. Rerunning the command resumes every part.

Every argument is checked before anything is written: experiment names are folder names (letters, digits, `_`,
`-`; not `parts` or `xla_cache`), each given once, each preset loads and passes `extkd reproduce`'s checks, and a
folder W/<name> that already holds something else (another experiment, a run) is refused, untouched. W is held
(`W/.lock`, the lock `extkd` runs take) for the whole command: a second launcher on it is refused, naming the first.
Exit status: 0 when every experiment's report lists all its methods; otherwise the first report's non-zero status
(3: every method diverged) or 3 when a method was left out; 1 when W is held by another process.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

NAME = re.compile(r"[A-Za-z0-9_-]+")  # an experiment's folder under --workdir
RESERVED = ("parts", "xla_cache")  # the launcher's own folders under --workdir
# relative cost of one run (larger first, so the slowest jobs do not start last); 1 for the others
COST = {"amkd": 6, "mismatch": 6, "ssd_kd": 4, "mtkd_ssr": 2, "reviewkd": 2, "ofd": 2, "ft": 2, "vid": 2}


@dataclass
class Job:
    method: str
    preset: str
    workdir: Path
    teacher: str | None  # the teacher run it distils from, or is scored against (None: has a copy already)
    settings: str  # the experiment's settings apart from `reproduce` (runs that share them share teachers)
    experiments: list[str] = field(default_factory=list)
    after_kd: Job | None = None  # the kd job whose selection runs it reuses (it runs at KD's chosen temperature)
    teachers: int = 1  # reproduce.teacher_seeds: its teacher runs are `teacher`, `teacher_1`, ...
    returncode: int | None = None
    seconds: float = 0.0


def _experiment_config(preset: str, overrides: list[str]):
    from extkd_jax.cli import parse_flags

    config, _, _ = parse_flags("reproduce", [f"--config={preset}", *overrides, "--workdir=unused"])
    return config


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:10]


def _settings(config) -> str:
    """The experiment's settings apart from the `reproduce` section: what its teacher and runs depend on."""
    settings = json.loads(config.to_json_best_effort())
    settings.pop("reproduce")
    return _digest(settings)


def _job_key(config, method: str) -> str:
    """Equal for a method in two experiments with the same settings and the same grid for it."""
    return f"{method}-{_digest([_settings(config), list(config.reproduce.grid.get(method, ()))])}"


def _command(preset: str, methods: list[str], overrides: list[str], workdir: Path) -> list[str]:
    listed = "(" + "".join(f"'{m}'," for m in methods) + ")"
    # an override of the method list chose the experiment's methods; each command names its own (given twice,
    # ml_collections would merge the two tuples)
    kept = [o for o in overrides if not o.startswith("--config.reproduce.methods=")]
    return [
        sys.executable,
        "-m",
        "extkd_jax.cli",
        "reproduce",
        f"--config={preset}",
        *kept,
        f"--config.reproduce.methods={listed}",
        f"--workdir={workdir}",
    ]


def _run(job: Job, overrides: list[str], deadline: float, env: dict) -> Job:
    job.workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(job.workdir / "part.log", "a") as log:
        try:
            job.returncode = subprocess.run(
                _command(job.preset, [job.method], overrides, job.workdir),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=max(deadline - time.time(), 1.0),
                check=False,
            ).returncode
        except subprocess.TimeoutExpired:
            job.returncode = -9
    job.seconds = time.time() - start
    print(f"[parallel] {job.method} ({job.workdir.name}): exit {job.returncode} in {job.seconds:.0f}s", flush=True)
    return job


def _finished(job: Job) -> bool:
    """Whether the job's reproduce finished: its method trained, or diverged (named in its results)."""
    from extkd_jax.cli import EXIT_ALL_DIVERGED

    return job.returncode in (0, EXIT_ALL_DIVERGED)


def _teacher_ready(trainer: Job) -> bool:
    """Whether the trainer's teacher is finished: its reproduce logs a student run only after training and scoring
    the teacher, which is not written to again."""
    if _finished(trainer):
        return True
    log = trainer.workdir / "part.log"
    text = log.read_text() if log.exists() else ""
    return "reproduce: runs/" in text or "reproduce: selection/" in text


def _kd_selection_ready(kd_job: Job) -> bool:
    """Whether the kd job's selection runs are all finished: its reproduce trains them before its reported runs
    (`runs/...`), and does not write to them again."""
    if _finished(kd_job):
        return True
    log = kd_job.workdir / "part.log"
    return "reproduce: runs/" in (log.read_text() if log.exists() else "")


def _copy_tree(source: Path, target: Path) -> None:
    """Copies the run directories under `source` (teacher, runs/, selection/) into `target`, leaving out locks."""
    shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".lock", "part.log"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument(
        "--experiment",
        action="append",
        required=True,
        metavar="NAME=PRESET",
        help="an experiment: its folder name under --workdir and its preset[:variant]",
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes at a time")
    parser.add_argument(
        "--deadline",
        type=float,
        default=0.0,
        help="seconds for the parallel jobs (0: no limit); the reports are written after it",
    )
    parser.add_argument(
        "--teacher-from",
        type=Path,
        default=None,
        help="a finished teacher run copied into every job that uses `teacher` (no job trains it)",
    )
    parser.add_argument("overrides", nargs="*", help="after --: --config.KEY=VALUE flags for every run")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers={args.workers}: expected at least 1")
    if args.teacher_from is not None and not (args.teacher_from / "config.json").is_file():
        parser.error(f"--teacher-from={args.teacher_from}: expected a teacher run's workdir (with config.json)")
    configs = _checked_experiments(parser, args)  # every argument, before anything is written
    from extkd_jax.train.lock import WorkdirLock, WorkdirLockedError

    try:
        with WorkdirLock(args.workdir, "parallel_reproduce"):
            return _launch(args, configs)
    except WorkdirLockedError as err:
        print(f"parallel_reproduce: error: {err}", file=sys.stderr)
        return 1


def _checked_experiments(parser: argparse.ArgumentParser, args) -> dict[str, tuple[str, object]]:
    """{name: (preset, config)} of the --experiment flags, each checked; a bad one is a usage error naming it."""
    from extkd_jax.cli import UsageError
    from extkd_jax.experiment.reproduce import check_experiment
    from extkd_jax.train.workdir import check_or_write_config, check_parents

    workdir = args.workdir
    try:
        check_parents(workdir)
    except ValueError as err:
        parser.error(f"--workdir: {err}")
    if workdir.exists() and not workdir.is_dir():
        parser.error(f"--workdir={workdir} is a file; expected a directory")
    if (workdir / "config.json").exists():
        parser.error(
            f"--workdir={workdir} holds an `extkd` run or experiment (config.json); the launcher's workdir holds "
            "parts/ and one folder per experiment: use another --workdir"
        )
    configs: dict[str, tuple[str, object]] = {}
    for spec in args.experiment:
        name, sep, preset = spec.partition("=")
        if not sep or not preset or not NAME.fullmatch(name) or name in RESERVED:
            parser.error(
                f"--experiment={spec!r}: expected NAME=PRESET, NAME a folder name of letters, digits, '_' and '-' "
                f"other than {' and '.join(map(repr, RESERVED))}"
            )
        if name in configs:
            parser.error(f"--experiment={spec!r}: the experiment name {name!r} is given twice; give each its own")
        try:
            config = _experiment_config(preset, args.overrides)
            check_experiment(config)
            check_or_write_config(workdir / name, config, kind="reproduce", write=False)
        except (UsageError, ValueError) as err:
            parser.error(f"--experiment={spec!r}: {err}")
        configs[name] = (preset, config)
    return configs


def _launch(args, configs: dict[str, tuple[str, object]]) -> int:
    """The jobs, then the reports, with --workdir held."""
    from extkd_jax.experiment.runs import METHODS, grid_of, teacher_run

    experiments: dict[str, tuple[str, list[str]]] = {}
    jobs: dict[str, Job] = {}
    for name, (preset, config) in configs.items():
        methods = list(config.reproduce.methods)
        experiments[name] = (preset, methods)
        for method in methods:
            key, spec_ = _job_key(config, method), METHODS[method]
            job = jobs.setdefault(
                key,
                Job(
                    method,
                    preset,
                    args.workdir / "parts" / key,
                    spec_.teacher if spec_.distils else "teacher",  # scratch: scored against `teacher`
                    _settings(config),
                    teachers=int(config.reproduce.teacher_seeds),
                ),
            )
            job.experiments.append(name)
        kd_key = _job_key(config, "kd")
        for method in methods:  # the methods at KD's chosen temperature reuse the kd job's selection runs
            if (
                method != "kd"
                and "kd" in methods
                and METHODS[method].uses_kd_temperature
                and len(grid_of(config, "kd")) > 1
            ):
                jobs[_job_key(config, method)].after_kd = jobs[kd_key]
    deadline = time.time() + args.deadline if args.deadline > 0 else float("inf")
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PYTHONUNBUFFERED": "1"}
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(args.workdir / "xla_cache"))

    if args.teacher_from is not None:  # a trained teacher: every job of it starts with a copy (the scratch
        for job in jobs.values():  # students too: they are scored against it, and would otherwise train one)
            if job.teacher in ("teacher", None):
                _copy_tree(args.teacher_from, job.workdir / "teacher")
                if job.teachers == 1:  # otherwise one job still trains teacher_1, ... for all (step 2)
                    job.teacher = None
    # the cheapest job of each teacher trains it; the others start as soon as it has begun its first student run
    teacher_jobs: dict[tuple[str, str], Job] = {}
    for job in sorted(jobs.values(), key=lambda j: COST.get(j.method, 1)):
        if job.teacher is not None:
            teacher_jobs.setdefault((job.teacher, job.settings), job)
    trainers = set(map(id, teacher_jobs.values()))
    for job in teacher_jobs.values():
        job.after_kd = None  # a teacher's trainer starts at once (and trains KD's grid itself if it needs it)
    waiting = sorted(
        (j for j in jobs.values() if (j.teacher is not None and id(j) not in trainers) or j.after_kd is not None),
        key=lambda j: -COST.get(j.method, 1),
    )
    print(
        f"[parallel] {len(jobs)} jobs, {args.workers} at a time; teachers trained by "
        f"{[j.method for j in teacher_jobs.values()]}; after kd's selection: "
        f"{[j.method for j in waiting if j.after_kd is not None]}",
        flush=True,
    )
    with futures.ThreadPoolExecutor(args.workers) as pool:
        running = {
            pool.submit(_run, j, args.overrides, deadline, env)
            for j in sorted(jobs.values(), key=lambda j: -COST.get(j.method, 1))
            if j not in waiting
        }
        while running or waiting:
            _, running = futures.wait(running, timeout=2.0, return_when=futures.FIRST_COMPLETED)
            for other in list(waiting):
                trainer = teacher_jobs.get((other.teacher, other.settings)) if id(other) not in trainers else None
                teacher_ok = trainer is None or _teacher_ready(trainer)
                teacher_failed = trainer is not None and trainer.returncode is not None and not _finished(trainer)
                kd = other.after_kd
                kd_ok = kd is None or _kd_selection_ready(kd) or (kd.returncode is not None and not _finished(kd))
                if teacher_failed:
                    waiting.remove(other)
                    other.returncode = trainer.returncode  # its teacher is missing
                elif teacher_ok and kd_ok:
                    waiting.remove(other)
                    if trainer is not None:  # every teacher seed's run: the trainer trained them all first
                        for k in range(other.teachers):
                            run = teacher_run(other.teacher, k)
                            if (trainer.workdir / run).is_dir():
                                _copy_tree(trainer.workdir / run, other.workdir / run)
                    if kd is not None and (kd.workdir / "selection" / "kd").is_dir():
                        # a failed kd job's finished selection runs are reused too; the rest are trained again
                        _copy_tree(kd.workdir / "selection" / "kd", other.workdir / "selection" / "kd")
                    running.add(pool.submit(_run, other, args.overrides, deadline, env))
    summary = {
        "jobs": {
            k: {"method": j.method, "experiments": j.experiments, "exit": j.returncode, "seconds": round(j.seconds, 1)}
            for k, j in jobs.items()
        },
        "reports": {},
    }
    reports = {}  # the experiments' reports, written side by side: each only scores its finished runs
    for name, (preset, methods) in experiments.items():
        done = [
            m for m in methods if all(_finished(j) for j in jobs.values() if j.method == m and name in j.experiments)
        ]
        target = args.workdir / name
        for job in jobs.values():
            if name in job.experiments and job.method in done:
                for sub in job.workdir.iterdir():
                    if sub.is_dir():
                        _copy_tree(sub, target / sub.name)
        missing = [m for m in methods if m not in done]
        summary["reports"][name] = {"preset": preset, "methods": done, "left_out": missing}
        if done:
            target.mkdir(parents=True, exist_ok=True)
            log = open(target / "report.log", "w")  # noqa: SIM115 - closed once the process ends
            reports[name] = (
                subprocess.Popen(
                    _command(preset, done, args.overrides, target), stdout=log, stderr=subprocess.STDOUT, env=env
                ),
                log,
                time.time(),
            )
    status = 0
    for name, report in summary["reports"].items():
        rc = 1
        if name in reports:
            process, log, start = reports[name]
            rc = process.wait()
            log.close()
            report["seconds"] = round(time.time() - start, 1)
        report["exit"] = rc
        print(f"[parallel] report {name}: exit {rc}, left out {report['left_out'] or 'none'}", flush=True)
        status = status or rc or (3 if report["left_out"] else 0)
    (args.workdir / "parallel_summary.json").write_text(json.dumps(summary, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
