"""The files `extkd reproduce` writes into its workdir: results.json, the resolved configs (`configs/`), report.md and
the plots, each written only when what it says changed.

Why: a rerun of a finished experiment only rescores finished runs, so it must not change its outputs. Figures that
describe the invocation rather than the results (its wall time, host and command line) do not count as a change:
when nothing else differs the stored results.json is kept byte for byte, the report keeps describing the invocation
that produced it, and nothing is written, which is also what lets a finished experiment report from a read-only disk.
On a read-only disk with outputs out of date the rerun is refused, naming the files it would have to write.
"""

from __future__ import annotations

import json
import logging

import ml_collections
from etils import epath

from extkd_jax.experiment.results import Results
from extkd_jax.train.workdir import config_to_dict, write_text_atomic

log = logging.getLogger(__name__)

# Results fields that describe the invocation, not the experiment's results
INVOCATION_FIELDS = ("wall_time_s", "hardware", "command")


def _results_key(results: Results) -> str:
    """The results' canonical text without the invocation's fields (text, so that NaN equals NaN)."""
    raw = json.loads(results.to_json())
    return json.dumps({k: v for k, v in raw.items() if k not in INVOCATION_FIELDS}, sort_keys=True)


def _stored_results(path: epath.Path) -> Results | None:
    """The results a results.json holds; None when it is missing or unreadable (then it is written again)."""
    if not path.exists():
        return None
    try:
        return Results.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as err:
        log.warning("%s is not a readable results file (%s: %s): it is written again", path, type(err).__name__, err)
        return None


def _config_key(text: str) -> str:
    """A resolved config's text without `teacher.workdir`: a moved experiment (e.g. copied back from a TPU VM) holds
    the same runs under another path."""
    raw = json.loads(text)
    if isinstance(raw.get("teacher"), dict):
        raw["teacher"].pop("workdir", None)
    return json.dumps(raw, sort_keys=True)


def write_outputs(
    workdir: epath.Path, results: Results, configs: dict[str, ml_collections.ConfigDict], read_only: bool = False
) -> Results:
    """Writes results.json, `configs/<name>.json`, the plots and report.md where their content changed; returns the
    results the workdir now holds (the stored ones when only the invocation's fields differ). `read_only`: the
    workdir cannot be written, so outputs out of date are an OSError naming them."""
    from extkd_jax.experiment.report import linked_figures, render_report

    workdir = epath.Path(workdir)
    writes: dict[epath.Path, str] = {}
    stale: list[str] = []  # what differs in more than a path
    for name, config in configs.items():
        path = workdir / "configs" / f"{name}.json"
        text = json.dumps(config_to_dict(config), indent=2)
        old = path.read_text() if path.exists() else None
        if old != text:
            writes[path] = text
            if old is None or _config_key(old) != _config_key(text):
                stale.append(f"configs/{name}.json")
    stored = _stored_results(workdir / "results.json")
    if stored is not None and _results_key(stored) == _results_key(results):
        results = stored
    else:
        writes[workdir / "results.json"] = results.to_json()
        stale.append("results.json")
    report = workdir / "report.md"
    old_report = report.read_text() if report.exists() else None
    figures = linked_figures(old_report or "")
    report_current = old_report is not None and old_report == render_report(results, figures)
    if not (report_current and all((workdir / f).exists() for f in figures.values())):
        stale.append("report.md and its figures")
    if read_only:
        if stale:
            raise OSError(
                f"workdir {workdir} is not writable: its {', '.join(stale)} are out of date; rerun where it can be "
                "written (its finished runs are reused)"
            )
        return results
    if writes:
        (workdir / "configs").mkdir(parents=True, exist_ok=True)
    for path, text in writes.items():
        write_text_atomic(path, text)
    if "report.md and its figures" in stale:
        from extkd_jax.experiment.plots import write_plots

        text = render_report(results, write_plots(results, workdir))
        if text != old_report:
            write_text_atomic(report, text)
    return results
