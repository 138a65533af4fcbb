"""`report.md` of `extkd reproduce`, rendered from a `Results`: every number is formatted straight from it.

Accuracies are fractions in [0, 1], shown in percent with one decimal as `mean ± std` (sample std, ddof=1) or
`mean (n=1)`; shifts are logits with two decimals. The main table sits between `<!-- main-table -->` and
`<!-- /main-table -->`. Verdicts come from the adjusted figures (`stats`): the primary comparison, declared before
the runs, by its own p at 0.05; every other one by its Holm-adjusted p within the report; none below 3 paired
values. Prose names no winner without a verdict.
"""

from __future__ import annotations

import math
import re

from etils import epath

from extkd_jax.experiment import stats
from extkd_jax.experiment.results import Comparison, Results, Stat
from extkd_jax.train.workdir import write_text_atomic

MAIN_TABLE_BEGIN = "<!-- main-table -->"
MAIN_TABLE_END = "<!-- /main-table -->"
MAIN_COLUMNS = (
    ("test_acc", "test acc (%)"),
    ("seen_acc", "seen acc (%)"),
    ("unseen_acc", "unseen acc (%)"),
    ("test_acc_corrected", "test acc corrected (%)"),
    ("unseen_acc_corrected", "unseen acc corrected (%)"),
)
METRIC_WORDS = {
    "unseen_acc_corrected": "the never-seen class(es), corrected",
    "test_acc_corrected": "the whole test set, corrected",
}


def pct(stat: Stat) -> str:
    if stat.std is None:
        return f"{stat.mean * 100:.1f} (n=1)"
    return f"{stat.mean * 100:.1f} ± {stat.std * 100:.1f}"


def points(value: float) -> str:
    return f"{value * 100:+.1f}"


def seconds(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.1f} s" if value < 120 else f"{value:.0f} s ({value / 60:.1f} min)"


def p_text(value: float | None) -> str:
    return "-" if value is None else (f"{value:.3f}" if value >= 0.001 else "<0.001")


def verdict(c: Comparison) -> str:
    """One sentence: ahead / behind with the interval and the p its verdict reads, no difference detected, or no
    verdict (n=1, or fewer than 3 paired values)."""
    what = f"on {METRIC_WORDS.get(c.metric, c.metric)}"
    label = "primary: " if c.primary else ""
    if c.ci95 is None:
        return (
            f"{label}{c.method} - {c.baseline} = {points(c.diff_mean)} points {what} on one seed (n=1): no interval, "
            "no verdict"
        )
    interval = f"95% CI {c.ci95[0] * 100:+.1f}..{c.ci95[1] * 100:+.1f}, {c.n} seeds"
    if c.n < stats.MIN_SEEDS:
        return (
            f"{label}{c.method} - {c.baseline} = {points(c.diff_mean)} points {what} ({interval}): "
            f"n < {stats.MIN_SEEDS}: no verdict"
        )
    which = f"p = {p_text(c.p)}" if c.primary else f"Holm-adjusted p = {p_text(c.p_holm)}"
    if not c.detected:
        return (
            f"{label}no difference detected between {c.method} and {c.baseline} {what} ({points(c.diff_mean)} "
            f"points, {interval}, {which})"
        )
    side = "ahead of" if c.diff_mean > 0 else "behind"
    by = f"by {abs(c.diff_mean) * 100:.1f} points"
    return f"{label}{c.method} is {side} {c.baseline} {by} {what} ({interval}, {which})"


def _few_pairs(results: Results) -> str:
    """The sentence on comparisons with fewer than `stats.MIN_SEEDS` paired values: how many, named, or none."""
    few = [c for c in results.comparisons if c.n < stats.MIN_SEEDS]
    if not few:
        return f" Every comparison has at least {stats.MIN_SEEDS} paired values."
    names = ", ".join(f"{c.method} - {c.baseline} ({METRIC_WORDS[c.metric]}, n = {c.n})" for c in few)
    return (
        f" {len(few)} comparison(s) with fewer than {stats.MIN_SEEDS} paired values show their interval and draw no "
        f"verdict: {names}."
    )


def protocol(results: Results) -> list[str]:
    """How many comparisons, which one is primary, how the verdicts are drawn, and what they are conditional on."""
    n = len(results.comparisons)
    primary = [c for c in results.comparisons if c.primary]
    when = (
        "set after these runs (results of an older protocol, whose knobs were chosen by the older criterion)"
        if results.older_protocol
        else "declared in the config before any run"
    )
    lines = [
        f"{n} comparison(s) in this report. "
        + (
            f"Primary, {when}: {primary[0].method} - {primary[0].baseline} on "
            f"{METRIC_WORDS[primary[0].metric]}, judged by its own p at 0.05. The other {n - 1} are exploratory: "
            "judged by Holm-adjusted p within this report (Benjamini-Hochberg q-values beside them)."
            if primary
            else f"No primary comparison ({' - '.join(results.primary) or 'none declared'} not run): all "
            "exploratory, judged by Holm-adjusted p within this report."
        )
        + _few_pairs(results)
    ]
    if results.teachers < 2:
        lines.append(
            "One teacher: every interval and verdict is conditional on this teacher (another teacher of the same "
            "recipe may give another result)."
        )
    else:
        per_teacher = "; the primary comparison per teacher:" if results.primary_by_teacher else "."
        lines.append(
            f"{results.teachers} teachers, each with its own students over the reported seeds: comparisons pair "
            f"(teacher, seed){per_teacher}"
        )
        lines += [f"- teacher {c.teacher}: {verdict(c)}." for c in results.primary_by_teacher]
    t = results.temperature
    if t:
        lines.append(
            f"Temperature: {', '.join(t['methods']) or 'no method'} ran at T = {t['value']:g} ({t['source']}): "
            f"{t['reason']}."
        )
    return lines


def _table(header: list[str], rows: list[list[str]], align: str = "---:") -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "|".join([align] * (len(header) - 1)) + "|"]
    return lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]


def _shifts(results: Results, runs) -> str:
    per_class = list(zip(*[r.bias_shift for r in runs], strict=True))
    return ", ".join(
        f"{results.class_names[c]}: {sum(v) / len(v):+.2f}"
        for c, v in zip(results.drop_classes, per_class, strict=True)
    )


def summary(results: Results) -> list[str]:
    t, ds = results.teacher, results.dataset
    lines = [
        f"The {t['model']} teacher, trained on all {ds['num_classes']} classes of {ds['name']}, reaches "
        f"{t['test_acc'] * 100:.1f}% test accuracy. Students ({results.student_model}) trained on a transfer set "
        f"without any image of {', '.join(repr(n) for n in results.dropped_names)}, {len(results.seeds)} "
        f"reported seed(s) per method:",
        "",
    ]
    for name, m in results.methods.items():
        lines.append(
            f"- **{name}**: {pct(m.stat('unseen_acc_corrected'))}% of the never-seen class(es) after the "
            f"label-free correction ({pct(m.stat('unseen_acc'))}% before); "
            f"{pct(m.stat('test_acc_corrected'))}% of the whole test set."
        )
    for name, reason in results.diverged.items():
        lines.append(f"- **{name}**: diverged, left out of every table and comparison ({reason}).")
    if results.comparisons:
        lines += ["", "Seed by seed, against KD and against Extended-KD:", ""]
        lines += [f"- {verdict(c)}." for c in results.comparisons]
    if results.comparisons or results.temperature:
        lines += ["", *protocol(results)]
    return lines


def write_report(results: Results, workdir: epath.Path, plots: dict[str, str]) -> epath.Path:
    """Writes `workdir/report.md`; `plots` are the figures `write_plots` wrote ({name: file})."""
    path = epath.Path(workdir) / "report.md"
    write_text_atomic(path, render_report(results, plots))
    return path


def render_report(results: Results, plots: dict[str, str]) -> str:
    """The text of report.md: a function of the results and the figures' names only (a rerun can compare it)."""
    ds, names = results.dataset, results.class_names
    out = [
        f"# Dark-knowledge experiment: {results.preset}",
        "",
        "## Summary",
        "",
        *summary(results),
        "",
        "## Setup",
        "",
        f"- **Data:** {ds['name']} ({ds['source']}), {ds['num_classes']} classes; train {ds['train_size']}, "
        f"transfer {ds['transfer_size']}, validation {ds['val_size']}, test {ds['test_size']}."
        + (f" {ds['note']}." if ds.get("note") else ""),
        f"- **Dropped from the transfer set:** {', '.join(results.dropped_names)} "
        f"(class {', '.join(map(str, results.drop_classes))}).",
        f"- **Teacher:** {results.teacher['model']}, {results.teacher['epochs']} epochs, "
        f"{results.teacher['test_acc'] * 100:.1f}% test accuracy, "
        f"{(results.teacher['unseen_acc'] or 0) * 100:.1f}% on the dropped class(es), "
        f"{seconds(results.teacher['wall_time_s'])}."
        + "".join(
            f" Teacher `{run}` (same architecture, its own objective): {t['test_acc'] * 100:.1f}% test accuracy, "
            f"{(t['unseen_acc'] or 0) * 100:.1f}% on the dropped class(es)."
            for run, t in results.teacher.get("others", {}).items()
        ),
        f"- **Students:** {results.student_model}, {results.epochs} epochs; reported seeds {results.seeds}; "
        f"knobs chosen with seed {results.selection_seed}, which is not reported.",
        f"- **Hardware:** {results.hardware['device_kind']} x{results.hardware['device_count']} "
        f"({results.hardware['platform']}), {results.hardware['cpu_count']} CPU cores; training time of all runs "
        f"{seconds(results.training_time_s)} (this invocation: {seconds(results.wall_time_s)}, runs found done "
        "are reused).",
        f"- **Command:** `{results.command}`",
        "",
        "## Bias correction",
        "",
        f"Label-free: {results.correction}. Shifts are in logits.",
        "",
        "## Results",
        "",
        "Accuracy in percent on the test set, mean ± sample standard deviation (ddof=1) over the reported seeds; "
        "*unseen*: images of the dropped classes; *corrected*: after the bias correction.",
        "",
        MAIN_TABLE_BEGIN,
    ]
    header = ["method", *[h for _, h in MAIN_COLUMNS], "bias shift (logits)", "knob", "wall time / run"]
    rows = [
        [
            name,
            *[pct(m.stat(k)) for k, _ in MAIN_COLUMNS],
            _shifts(results, m.runs),
            "-" if m.knob is None else f"{m.knob}={m.chosen:g}",
            seconds(sum(r.wall_time_s for r in m.runs) / len(m.runs)),
        ]
        for name, m in results.methods.items()
    ]
    out += _table(header, rows) + [MAIN_TABLE_END, ""]
    if results.diverged:
        out += [f"Diverged (a run stopped on a non-finite loss, so no figures): {', '.join(results.diverged)}.", ""]
    if results.comparisons:
        out += [
            "## Paired comparisons with KD and Extended-KD",
            "",
            "Per-seed differences (method − baseline, same teacher and seed: same initialisation and data order); "
            "95% interval and two-sided p from Student's t; p Holm-adjusted and Benjamini-Hochberg q within the "
            f"exploratory family; {len(results.comparisons)} comparisons. The verdict reads p for the primary "
            f"comparison and Holm's p for the others; none below {stats.MIN_SEEDS} paired values.",
            "",
        ]
        out += _table(
            ["method", "baseline", "metric", "n", "mean difference (points)", "95% CI", "p", "p Holm", "q BH"]
            + ["verdict"],
            [
                [
                    c.method + (" (primary)" if c.primary else ""),
                    c.baseline,
                    c.metric,
                    c.n,
                    points(c.diff_mean),
                    "-" if c.ci95 is None else f"{c.ci95[0] * 100:+.1f}..{c.ci95[1] * 100:+.1f}",
                    p_text(c.p),
                    p_text(c.p_holm),
                    p_text(c.q_bh),
                    "n=1" if c.ci95 is None else c.verdict,
                ]
                for c in results.comparisons
            ],
        ) + [""]
    tuned = {n: m for n, m in results.methods.items() if m.grid}
    if tuned:
        out += [
            "## Knob selection",
            "",
            "Each grid value trained once with the selection seed. The criterion is the corrected accuracy on a "
            "labelled set of seen-class validation images, the shift fitted on a disjoint unlabelled pool of every "
            "class (dropped-class images enter only there, unlabelled)"
            + (
                f": {sel['labelled_size']} labelled, {sel['pool_size']} in the pool, overlap {sel['overlap']}, "
                f"dropped-class images in the labelled set {sel['dropped_in_labelled']}"
                if (sel := results.selection)
                else " (results of an older version: the shift was fitted on every validation image)"
            )
            + ". Test figures are shown, never used.",
            "",
        ]
        for name, m in tuned.items():
            out += [f"### {name} ({m.knob})", ""]
            out += _table(
                [m.knob, "criterion (%)", "test acc corrected (%)", "unseen corrected (%)", "choice"],
                [
                    [
                        f"{p.value:g}",
                        f"{p.run.val_seen_acc_corrected * 100:.2f}",
                        f"{p.run.test_acc_corrected * 100:.1f}",
                        f"{p.run.unseen_acc_corrected * 100:.1f}",
                        ("**chosen** (tie)" if m.tie else "**chosen**")
                        if p.value == m.chosen
                        else ("tie" if p.value in m.tie else ""),
                    ]
                    for p in m.grid
                ]
                + [[value, "diverged", "-", "-", ""] for value in m.diverged_grid],
            ) + [""]
            out += [f"{m.knob}={value} diverged: {reason}." for value, reason in m.diverged_grid.items()]
            out += [""] if m.diverged_grid else []
            if m.tie:
                out += [f"Tie between {m.tie}: the value nearest the preset's was kept.", ""]
    oracle = {n: m for n, m in results.methods.items() if m.runs[0].oracle}
    if oracle:
        out += ["## Oracle correction (uses dropped-class labels; not a result)", ""]
        out += _table(
            ["method", "unseen acc (%)", "test acc (%)"],
            [
                [
                    n,
                    pct(Stat.of([r.oracle["unseen_acc"] for r in m.runs])),
                    pct(Stat.of([r.oracle["test_acc"] for r in m.runs])),
                ]
                for n, m in oracle.items()
            ],
        ) + [""]
    if results.curve:
        out += [
            "## Dark-knowledge curve",
            "",
            "Accuracy on the dropped class(es) when a fraction of their training examples is kept.",
            "",
        ]
        fractions = sorted({p.keep_fraction for p in results.curve})
        by = {(p.method, p.keep_fraction): p for p in results.curve}
        out += _table(
            ["method", *[f"kept {f * 100:g}%" for f in fractions]],
            [
                [
                    m,
                    *[
                        pct(by[(m, f)].unseen_acc_corrected) + f" ({by[(m, f)].unseen_acc.mean * 100:.1f} before)"
                        for f in fractions
                    ],
                ]
                for m in dict.fromkeys(p.method for p in results.curve)
            ],
        ) + [""]
    out += ["## Per-class accuracy after correction", ""]
    out += _table(
        ["class", "teacher", *results.methods],
        [
            [
                f"{n}*" if i in results.drop_classes else n,
                f"{results.teacher['per_class_acc'][i] * 100:.1f}",
                *[f"{m.per_class(True)[0][i] * 100:.1f}" for m in results.methods.values()],
            ]
            for i, n in enumerate(names)
        ],
    )
    out += ["", "\\* dropped from the transfer set.", ""]
    if plots:
        out += ["## Figures", ""] + [f"![{name}]({file})" for name, file in plots.items()] + [""]
    return "\n".join(out)


def linked_figures(report_text: str) -> dict[str, str]:
    """{figure name: file} of the figures a report.md links (its `## Figures` section), as `plots` was."""
    _, found, figures = report_text.partition("\n## Figures\n")
    if not found:
        return {}
    return dict(re.findall(r"^!\[([^\]]*)\]\(([^)]*)\)$", figures, flags=re.MULTILINE))


def readme_table(results: Results) -> str:
    """The README's table of an experiment (`readme_table.readme_table`)."""
    from extkd_jax.experiment import readme_table as module

    return module.readme_table(results)


def readme_table_of(workdir: str | epath.Path) -> str:
    """`extkd report --workdir=DIR`: the README table of DIR/results.json (`readme_table.readme_table_of`)."""
    from extkd_jax.experiment import readme_table as module

    return module.readme_table_of(workdir)
