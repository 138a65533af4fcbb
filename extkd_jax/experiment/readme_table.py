"""The README's table of an experiment (`extkd report --workdir=DIR`): each student's figures and its comparison
with KD on the dropped classes after correction, worded from the adjusted figures, and how many comparisons the
experiment made. tests/test_docs.py checks the README against the committed results."""

from __future__ import annotations

from etils import epath

from extkd_jax.experiment import stats
from extkd_jax.experiment.report import _table, p_text, pct
from extkd_jax.experiment.results import Comparison, Results


def _against_kd(c: Comparison | None) -> str:
    """`+2.4 (+1.1..+3.7), Holm p 0.210: no difference detected`, or `-` without a comparison."""
    if c is None:
        return "-"
    diff = f"{c.diff_mean * 100:+.1f}"
    if c.ci95 is None:
        return f"{diff} (n=1): no verdict"
    interval = f"{diff} ({c.ci95[0] * 100:+.1f}..{c.ci95[1] * 100:+.1f})"
    if c.n < stats.MIN_SEEDS:
        return f"{interval}: {c.verdict}"
    which = f"primary, p {p_text(c.p)}" if c.primary else f"Holm p {p_text(c.p_holm)}"
    return f"{interval}, {which}: {c.verdict}"


def footer(results: Results) -> str:
    """How many comparisons, which is primary, how verdicts are drawn, and the teachers they are conditional on."""
    n = len(results.comparisons)
    primary = next((c for c in results.comparisons if c.primary), None)
    words = f"{n} comparisons (each method against KD and against Extended-KD, dropped classes and whole test set)"
    when = "set after these runs (older protocol)" if results.older_protocol else "declared before the runs"
    if primary is not None:
        words += (
            f"; primary, {when}: {primary.method} − {primary.baseline} on the dropped classes, "
            "corrected; the others exploratory, Holm-adjusted within the experiment"
        )
    else:
        words += "; all exploratory, Holm-adjusted within the experiment"
    words += f"; no verdict below {stats.MIN_SEEDS} seeds"
    teachers = "one teacher: conditional on it" if results.teachers < 2 else f"{results.teachers} teachers pooled"
    return f"{words}; {teachers}."


def readme_table(results: Results) -> str:
    """The short table the README shows for an experiment, then one line of how its verdicts were drawn."""
    dropped = ", ".join(results.dropped_names)
    against = {c.method: c for c in results.comparisons if c.baseline == "kd" and c.metric == stats.PRIMARY_METRIC}
    rows = [
        [
            name if m.knob is None else f"{name} ({m.knob}={m.chosen:g})",
            pct(m.stat("test_acc_corrected")),
            pct(m.stat("unseen_acc")),
            pct(m.stat("unseen_acc_corrected")),
            _against_kd(against.get(name)),
        ]
        for name, m in results.methods.items()
    ] + [[name, "diverged", "-", "-", "-"] for name in results.diverged]
    header = [
        "student",
        "test acc, corrected (%)",
        f"{dropped} right, before (%)",
        f"{dropped} right, corrected (%)",
        f"− KD on {dropped}, corrected (points, 95% CI): verdict",
    ]
    return "\n".join([*_table(header, rows), "", footer(results)])


def readme_table_of(workdir: str | epath.Path) -> str:
    """`extkd report --workdir=DIR`: the README table of DIR/results.json."""
    path = epath.Path(workdir) / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: `extkd reproduce --workdir={workdir}` writes it")
    fix = f"rerun `extkd reproduce` with the same config and --workdir={workdir} to write it again"
    try:
        return readme_table(Results.from_json(path.read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a readable results file ({type(err).__name__}: {err}); {fix}") from None
