"""The headline figures of a `benchmarks/device_check.sh` run as one JSON line (read from the files in OUT).

python benchmarks/device_check_summary.py OUT        # STATUSES, WALL and MODE come from the environment
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import xml.etree.ElementTree as ET


def _load(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tests(out: pathlib.Path) -> dict | None:
    try:
        root = ET.parse(out / "tests.xml").getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [
        f"{c.get('classname')}::{c.get('name')}"
        for c in suite.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
    return counts


def _throughput(result: dict | None) -> dict | None:
    if not result:
        return None
    main = next((name for name in result.get("img_per_s", {}) if name.startswith("jax scan")), None)
    ratios = result.get("ratios", {}).get(main, {}) if main else {}
    profile = next(
        (
            r["scan"]["profile"]
            for per in result.get("jax", {}).values()
            for r in per.values()
            if isinstance(r, dict) and "profile" in r.get("scan", {})
        ),
        None,
    )
    return {
        "device": result.get("host", {}).get("device_kind"),
        "img_per_s": result.get("img_per_s"),
        "ours_vs_torch_compile_amp": ratios.get("vs_torch_compile_amp_bf16"),
        "ours_vs_torch_eager_fp32": ratios.get("vs_torch_eager_fp32"),
        "profile_by_category": {k: round(v["fraction"], 3) for k, v in (profile or {}).get("by_category", {}).items()},
        "breakdown": result.get("breakdown"),
    }


def _experiment(path: pathlib.Path) -> dict | None:
    from extkd_jax.experiment.results import Results

    try:
        results = Results.from_json(path.read_text())
    except OSError:
        return None
    return {
        "teacher_test_acc": results.teacher["test_acc"],
        "teacher_wall_s": results.teacher["wall_time_s"],
        "students": {
            name: {k: m.stat(k).mean for k in ("test_acc", "unseen_acc", "unseen_acc_corrected")}
            for name, m in results.methods.items()
        },
        "wall_s": results.wall_time_s,
    }


# Sanity floors of the short runs: a 10-class teacher far above chance; students near it.
TEACHER_FLOOR = {"cpu": 0.3, "device": 0.7}


def checks(mode: str, experiment: dict | None, tests: dict | None) -> dict:
    """Pass/fail of what a reader needs before trusting the figures."""
    out = {"tests_passed": bool(tests) and tests["failures"] == 0 and tests["errors"] == 0 and tests["tests"] > 0}
    if experiment:
        teacher = experiment["teacher_test_acc"]
        out["teacher_sane"] = teacher >= TEACHER_FLOOR.get(mode, 0.7)
        if mode == "device":  # the --cpu rehearsal trains toy models for an epoch or two: only the teacher counts
            out["students_sane"] = all(s["test_acc"] >= 0.5 * teacher for s in experiment["students"].values())
    return out


def summarize(out: pathlib.Path) -> dict:
    statuses = dict(kv.split("=", 1) for kv in os.environ.get("STATUSES", "").split(";") if "=" in kv)
    mode = os.environ.get("MODE", "")
    experiment = _experiment(out / "cifar10_results.json")
    tests = _tests(out)
    return {
        "checks": checks(mode, experiment, tests),
        "mode": mode,
        "wall_s": int(os.environ.get("WALL", "0") or 0),
        "phases": statuses,
        "tests": tests,
        "throughput": _throughput(_load(out / "throughput.json")),
        "baseline": _throughput(_load(out / "throughput_baseline.json")),
        "cifar10": experiment,
    }


if __name__ == "__main__":
    print(json.dumps(summarize(pathlib.Path(sys.argv[1])), default=str))
