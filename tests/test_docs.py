"""Every figure of the README and of docs/results/README.md comes from a committed results.json (no figure without
one behind it), the results index lists every committed report, and the README's method table and `loss.name` list
are the project's method lists.

The claims table of the README marks each row with the file and the comparison it quotes
(`<!-- claim: docs/results/<name>/results.json comparison=<method>-<baseline> metric=<metric> -->`, or
`value=<method>` with an optional `reference=<percent>`); `claim_cells` recomputes the row's seeds, figure and
verdict from that file. Run this module as a script to print the generated rows and the index.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import sys

import pytest

from extkd_jax.experiment import stats
from extkd_jax.experiment.report import linked_figures, p_text, pct, readme_table_of, render_report
from extkd_jax.experiment.results import Comparison, Results, metric_resolution, t95
from tests.tiny import REPO_ROOT

README = REPO_ROOT / "README.md"
RESULTS_DIR = REPO_ROOT / "docs" / "results"
RESULTS_INDEX = RESULTS_DIR / "README.md"
MAX_README_LINES = 300
BLOCK = re.compile(r"<!-- results: (\S+) -->\n(.*?)\n<!-- /results -->", re.S)
CLAIM = re.compile(r"<!-- claim: (\S+) ((?:\w+=\S+ ?)+)-->")
SETTINGS_OF_COMMAND = ("progress", "data.dir", "reproduce.methods")  # shown elsewhere or about the machine


def _blocks() -> list[tuple[str, str]]:
    return BLOCK.findall(RESULTS_INDEX.read_text()) if RESULTS_INDEX.exists() else []


def report_folders() -> list[str]:
    """Every committed report: the folders of docs/results/ that hold a results.json."""
    return sorted(p.parent.name for p in RESULTS_DIR.glob("*/results.json"))


def _load(path: str) -> Results:
    return Results.from_json((REPO_ROOT / path).read_text())


# ---------------------------------------------------------------------------------------------------------- index
def _preset(command: str) -> str:
    """`--config=configs/mnist_omit3.py:zoo` -> `mnist_omit3:zoo`, then the overrides that change the experiment."""
    args = shlex.split(command)
    config = next(a.split("=", 1)[1] for a in args if a.startswith("--config="))
    config = re.sub(r"^(?:.*/)?configs/(\w+)\.py", r"\1", config)
    overrides = [
        a.removeprefix("--config.")
        for a in args
        if a.startswith("--config.") and a.removeprefix("--config.").split("=")[0] not in SETTINGS_OF_COMMAND
    ]
    return " ".join(f"`{x}`" for x in [config, *overrides])


def _machine(hardware: dict) -> str:
    if hardware.get("platform") == "cpu":
        return f"{hardware.get('cpu_count', '?')}-core CPU"
    return f"{hardware.get('device_count', 1)} x {hardware['device_kind']}"


def index_row(name: str) -> str:
    """One line of docs/results/README.md's index: the report, its preset and overrides, its students, the machine,
    seeds × teachers, the protocol it ran under, and the training time of every run behind it, summed (what a rerun
    from scratch costs)."""
    r = _load(f"docs/results/{name}/results.json")
    students = list(r.methods) + list(r.diverged)
    return (
        f"| [{name}]({name}/report.md) | {_preset(r.command)} | {len(students)}: {', '.join(students)} | "
        f"{_machine(r.hardware)} | {len(r.seeds)} × {r.teachers} | {'older' if r.older_protocol else 'current'} | "
        f"{r.training_time_s / 60:.1f} |"
    )


def index_table() -> str:
    header = "| report | preset and overrides | students | machine | seeds × teachers | protocol | training (min) |"
    return "\n".join([header, "|---|---|---|---|---|---|---:|", *(index_row(name) for name in report_folders())])


CURVE = re.compile(r"<!-- curve: (\S+) -->\n(.*?)\n<!-- /curve -->", re.S)


def curve_table(results: Results) -> str:
    """The dark-knowledge curve of a report: the dropped classes right after correction, per kept fraction."""
    fractions = sorted({p.keep_fraction for p in results.curve})
    cells = {(p.method, p.keep_fraction): pct(p.unseen_acc_corrected) for p in results.curve}
    methods = list(dict.fromkeys(p.method for p in results.curve))
    lines = ["| student | " + " | ".join(f"kept {f * 100:g}%" for f in fractions) + " |"]
    lines.append("|---|" + "---:|" * len(fractions))
    lines += [f"| {m} | " + " | ".join(cells.get((m, f), "-") for f in fractions) + " |" for m in methods]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- claims
def _find(results: Results, method: str, baseline: str, metric: str) -> Comparison | None:
    for c in results.comparisons:
        if (c.method, c.baseline, c.metric, c.teacher) == (method, baseline, metric, None):
            return c
    return None


def _interval(c: Comparison) -> str:
    if c.ci95 is None:
        return f"{c.diff_mean * 100:+.1f} points (n=1)"
    return f"{c.diff_mean * 100:+.1f} points (95% CI {c.ci95[0] * 100:+.1f}..{c.ci95[1] * 100:+.1f})"


def _comparison_cells(results: Results, method: str, baseline: str, metric: str) -> tuple[str, str]:
    """A comparison of the report: its verdict as the report words it (primary: own p; others: Holm). One the report
    did not make (e.g. against a scratch student): paired here as `Comparison.paired` does, judged by Bonferroni
    over the report's comparisons and this one (never looser than Holm)."""
    c = _find(results, method, baseline, metric)
    if c is not None:
        if c.n < stats.MIN_SEEDS or stats.decision_p(c) is None:
            return _interval(c), c.verdict
        which = f"primary, p {p_text(c.p)}" if c.primary else f"Holm p {p_text(c.p_holm)}"
        return _interval(c), f"{c.verdict} ({which})"
    resolution = metric_resolution(results.methods, results.drop_classes).get(metric, 0.0)
    c = Comparison.paired(results.methods[method], results.methods[baseline], metric, resolution)
    if c.n < stats.MIN_SEEDS or c.p is None:
        return _interval(c), f"n < {stats.MIN_SEEDS}: no verdict"
    m = len(results.comparisons) + 1
    bonferroni = min(1.0, c.p * m)
    word = "difference detected" if bonferroni < stats.ALPHA else "no difference detected"
    return _interval(c), f"{word} (Bonferroni p {p_text(bonferroni)} over {m} comparisons)"


def _value_cells(results: Results, method: str, metric: str, reference: float | None) -> tuple[str, str]:
    """A method's mean with its Student-t 95% interval over the (teacher, seed) runs; against a published value."""
    s = results.methods[method].stat(metric)
    if s.std is None:
        return f"{s.mean * 100:.1f}% (n=1)", "n=1: no interval"
    half = t95(s.n - 1) * s.std / math.sqrt(s.n)
    lo, hi = (s.mean - half) * 100, (s.mean + half) * 100
    figure = f"{s.mean * 100:.1f}% (95% CI {lo:.1f}..{hi:.1f})"
    if reference is None:
        return figure, "descriptive, no test"
    where = "inside" if lo <= reference <= hi else "outside"
    return figure, f"the published {reference:g}% is {where} the interval"


def claim_cells(marker: str) -> tuple[str, str, str]:
    """(seeds × teachers, figure, verdict) of a claim marker's `path key=value ...`, from its results.json."""
    found = CLAIM.search(marker)
    assert found, f"not a claim marker: {marker!r}"
    path, rest = found.group(1), found.group(2)
    keys = dict(kv.split("=", 1) for kv in rest.split())
    results = _load(path)
    metric = keys["metric"]
    if "comparison" in keys:
        method, baseline = keys["comparison"].split("-")
        figure, verdict = _comparison_cells(results, method, baseline, metric)
        # the (teacher, seed) pairs both methods have: a scratch student learns from no teacher (teacher 0 only)
        runs = [{(r.teacher_index, r.seed) for r in results.methods[m].runs} for m in (method, baseline)]
        teachers = len({t for t, _ in runs[0] & runs[1]})
    else:
        reference = float(keys["reference"]) if "reference" in keys else None
        figure, verdict = _value_cells(results, keys["value"], metric, reference)
        teachers = len({r.teacher_index for r in results.methods[keys["value"]].runs})
    return f"{len(results.seeds)} × {teachers}", figure, verdict


def _claim_rows() -> list[tuple[str, list[str]]]:
    rows = []
    for line in README.read_text().splitlines():
        if "<!-- claim:" in line:
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            rows.append((line, cells))
    return rows


# ---------------------------------------------------------------------------------------------------------- methods
METHOD_ROW = re.compile(r"^\| `(\w+)` \| (.*) \| (?:\[recipe\]\(docs/reference_recipes\.md\)|-) \|$")


def method_row(name: str, method) -> str:
    """The README's row of a method: its name, what it distils and from whom, its reference recipe."""
    recipe = "[recipe](docs/reference_recipes.md)" if method.distils else "-"
    return f"| `{name}` | {method.description} | {recipe} |"


def loss_name_row() -> str:
    """docs/config.md's `loss.name` row: every value the config check accepts (the registry's loss_names)."""
    from extkd_jax.methods import get_method, loss_names

    alone = [n for n in loss_names() if "teacher" not in get_method(n).needs]
    names = ", ".join(f"`{n}`" for n in loss_names())
    return (
        f"| `loss.name` | ce | {names}: {', '.join(alone)} train from labels (a teacher, or a student without one), "
        "the others distil ([methods](methods.md)) |"
    )


def knob_rows() -> list[str]:
    """docs/config.md's table of each method's own knobs (`loss.<method>.<knob>`), its tuned knob and its grid."""
    from extkd_jax.methods import get_method, method_names

    rows = []
    for name in method_names():
        m = get_method(name)
        if m.objective is None:
            continue
        knobs = ", ".join(f"`loss.{name}.{k}={v!r}`" for k, v in m.knobs.items()) or "-"
        grid = {"temperature": "the preset's KD grid", "init_stage": "(0.1, 0.25) x num_epochs"}.get(m.grid, m.grid)
        tuned = f"`loss.{m.knob}` over {grid}" if m.knob else "-"
        rows.append(f"| `{name}` | {knobs} | {tuned} |")
    return rows


def _readme_methods() -> list[str]:
    return [m.group(1) for line in README.read_text().splitlines() if (m := METHOD_ROW.match(line))]


# ---------------------------------------------------------------------------------------------------------- tests
def test_the_readme_is_at_most_300_lines():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; at most {MAX_README_LINES} (move material to docs/)"


def test_the_results_index_has_result_tables():
    assert len(_blocks()) >= 3


@pytest.mark.parametrize("path,table", _blocks(), ids=[p for p, _ in _blocks()])
def test_each_results_table_is_extkd_report_of_its_folder(path, table):
    """Each table of docs/results/README.md is what `extkd report --workdir=<its folder>` prints."""
    folder = REPO_ROOT / path
    assert folder.name == "results.json", path
    assert table.strip() == readme_table_of(folder.parent)


def test_the_results_index_lists_every_committed_report():
    text = RESULTS_INDEX.read_text()
    folders = report_folders()
    assert len(folders) >= 10
    for name in folders:
        assert index_row(name) in text.splitlines(), f"docs/results/README.md: no index row for {name}"
        assert f"({name}/report.md)" in text
    linked = set(re.findall(r"\]\((\w+)/report\.md\)", text))
    assert linked <= set(folders), f"links to reports that are not committed: {sorted(linked - set(folders))}"


def _current_reports() -> list[str]:
    return [n for n in report_folders() if not _load(f"docs/results/{n}/results.json").older_protocol]


@pytest.mark.parametrize("name", _current_reports())
def test_each_current_report_md_is_rendered_from_its_results_json(name):
    """Each committed report of the current protocol reads what `render_report` writes from its results.json (and
    its figures): no hand edit, no text left from older code. The older-protocol reports were written by older code."""
    folder = REPO_ROOT / "docs" / "results" / name
    text = (folder / "report.md").read_text()
    assert text == render_report(_load(f"docs/results/{name}/results.json"), linked_figures(text))


@pytest.mark.parametrize("path,table", CURVE.findall(RESULTS_INDEX.read_text()) if RESULTS_INDEX.exists() else [])
def test_each_curve_table_is_its_results_json(path, table):
    assert table.strip() == curve_table(_load(path))


PROSE_CI = re.compile(r"CI ([+-]\d+\.\d)\.\.([+-]\d+\.\d)")


def _all_intervals() -> set[str]:
    """Every paired 95% interval the committed reports hold or give (each pair of their methods, headline metrics,
    the primary comparison per teacher)."""
    out = set()
    for name in report_folders():
        results = _load(f"docs/results/{name}/results.json")
        found = list(results.comparisons) + list(results.primary_by_teacher)
        resolution = metric_resolution(results.methods, results.drop_classes)
        for a in results.methods.values():
            for b in results.methods.values():
                if a is not b:
                    found += [Comparison.paired(a, b, m, resolution.get(m, 0.0)) for m in resolution]
        out |= {f"{c.ci95[0] * 100:+.1f}..{c.ci95[1] * 100:+.1f}" for c in found if c.ci95 is not None}
    return out


def _assert_every_quoted_interval_is_committed(text: str) -> None:
    quoted = {f"{lo}..{hi}" for lo, hi in PROSE_CI.findall(text)}
    assert len(quoted) >= 10
    assert quoted <= _all_intervals(), sorted(quoted - _all_intervals())


def test_every_interval_in_the_results_prose_is_in_a_results_json():
    """The prose around the tables quotes no interval that no committed report gives (a stale one fails)."""
    prose = CURVE.sub("", BLOCK.sub("", RESULTS_INDEX.read_text()))
    _assert_every_quoted_interval_is_committed(prose)
    assert "FitNet (+1.1 points against KD, 95% CI -1.2..+3.4)" not in prose  # the stale interval once quoted


def test_every_interval_in_the_readme_is_in_a_results_json():
    """The README's prose and claim rows quote no interval that no committed report gives."""
    _assert_every_quoted_interval_is_committed(README.read_text())


def test_the_readme_links_the_results_index():
    assert "(docs/results/README.md)" in README.read_text()


def test_each_claim_is_its_results_json():
    rows = _claim_rows()
    assert len(rows) >= 5, "the README's claims table marks each row with <!-- claim: ... -->"
    for line, cells in rows:
        assert len(cells) == 5, line
        seeds, figure, verdict = claim_cells(line)
        path = CLAIM.search(line).group(1)
        assert _load(path).preset.split(":")[0] in cells[1], (cells[1], path)
        assert cells[2] == seeds, (line, seeds)
        assert cells[3] == figure, (line, figure)
        assert cells[4].startswith(verdict), (line, verdict)


def test_claim_cells_recompute_from_the_runs():
    """An independent check of the recomputation: the digits report's Extended-KD - KD on the 3s, from its runs."""
    results = _load("docs/results/digits_omit3/results.json")
    kd = {(r.teacher_index, r.seed): r.unseen_acc_corrected for r in results.methods["kd"].runs}
    ext = {(r.teacher_index, r.seed): r.unseen_acc_corrected for r in results.methods["extended_kd"].runs}
    mean = sum(ext[s] - kd[s] for s in kd) / len(kd)
    _, figure, verdict = claim_cells(
        "<!-- claim: docs/results/digits_omit3/results.json comparison=extended_kd-kd metric=unseen_acc_corrected -->"
    )
    assert figure.startswith(f"{mean * 100:+.1f} points (95% CI ")
    assert verdict.startswith("no difference detected (primary, p ")


def test_the_readme_method_table_is_the_method_list():
    """One row per method of `extkd reproduce` (the registry's role_names, built-in ones), in its order, each with
    its description and a link to its reference recipe."""
    from extkd_jax.methods import get_method
    from extkd_jax.methods.registry import builtin_names, role_names

    roles = [n for n in role_names() if n in builtin_names()]
    assert _readme_methods() == roles
    text = README.read_text()
    for name in roles:
        assert method_row(name, get_method(name)) in text.splitlines(), name


def test_the_loss_name_list_is_the_registry_list():
    """docs/config.md's `loss.name` row names every loss the config check accepts (the registry's), and nothing
    else; its knob table is each method's own knobs, defaults, tuned knob and grid."""
    from extkd_jax.methods import loss_names

    lines = (REPO_ROOT / "docs" / "config.md").read_text().splitlines()
    row = next(line for line in lines if "| `loss.name` |" in line)
    listed = re.findall(r"`(\w+)`", row.split("|")[3])
    assert listed == list(loss_names()), (listed, loss_names())
    assert row == loss_name_row()
    for knob_row in knob_rows():
        assert knob_row in lines, knob_row


def test_the_readme_quotes_the_number_of_fault_tests():
    """README's reliability figure is the number of tests `pytest -m fault` collects."""
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "fault", "--collect-only", "-q", "-p", "no:randomly", "tests"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    collected = re.search(r"(\d+)/\d+ tests collected", out.stdout)
    assert collected, out.stdout[-2000:]
    n = collected.group(1)
    assert f"injects **{n} faults; all {n} are survived" in README.read_text()


if __name__ == "__main__":  # the generated lines, to paste: the index rows, then the claim rows' cells
    print(index_table())
    for line, _ in _claim_rows():
        print(claim_cells(line))
    from extkd_jax.methods import get_method, role_names

    print(loss_name_row())
    print("\n".join(knob_rows()))
    for name in role_names():
        print(method_row(name, get_method(name)))


def _ratio_range(path: str, label: str, key: str, batches=None) -> str:
    """'lo-hi' of a committed throughput JSON's ratios for `label` (2 decimals), over `batches` (all when None)."""
    ratios = json.loads((REPO_ROOT / "benchmarks" / "results" / path).read_text())["ratios"][label][key]
    values = [v for b, v in ratios.items() if batches is None or int(b) in batches]
    return f"{min(values):.2f}-{max(values):.2f}"


def test_the_readme_performance_figures_are_the_committed_benchmarks():
    """The README's Performance paragraph quotes the committed throughput JSONs: the H100 ratios against
    torch.compile and rates at batch 1024, and the CPU ratios against torch eager fp32 at batch 32-128."""
    text = " ".join(README.read_text().split("## Performance", 1)[1].split("\n## ", 1)[0].split())
    gpu = [
        json.loads((REPO_ROOT / "benchmarks/results" / run / "throughput.json").read_text())
        for run in ("device_check_h100_20261126", "device_check_h100_20261127_run2")
    ]
    rates = {round(g["jax"]["bf16_fold"]["1024"]["scan"]["img_per_s"], -3) for g in gpu}
    assert rates == {102000.0} and "ran 102k img/s at batch 1024" in text
    compiled = sorted(
        next(v for k, v in g["ratios"]["jax scan bf16_fold"].items() if "compile" in k)["1024"] for g in gpu
    )
    assert f"{compiled[0]:.2f}x and {compiled[1]:.2f}x `torch.compile` AMP" in text
    label, key, batches = "jax dispatch f32_nofold", "vs_torch_eager_fp32", (32, 64, 128)
    one = _ratio_range("throughput_cpu_20261202_1dev.json", label, key, batches)
    two = _ratio_range("throughput_cpu_20261202_2dev.json", label, key, batches)
    assert f"ours is {one}x PyTorch eager fp32 at batch 32-128, {two}x with one JAX device per core" in text
