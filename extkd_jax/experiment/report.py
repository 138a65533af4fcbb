"""`report.md` for `extkd reproduce`: every number is formatted straight from the `results` dict.

Accuracies in `results` are fractions in [0, 1]; the report shows them in percent with one decimal,
`f"{mean * 100:.1f} ± {std * 100:.1f}"`, so each cell can be recomputed from `results.json`.
The bias shift is a logit offset, not an accuracy: it is shown in logits with two decimals.

The main table sits between `<!-- main-table -->` and `<!-- /main-table -->`; its header row starts
with `| method |`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MAIN_TABLE_BEGIN = "<!-- main-table -->"
MAIN_TABLE_END = "<!-- /main-table -->"

# (results key, column header, kind): kind "pct" is a fraction shown in percent, "logit" a raw shift.
MAIN_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("test_acc", "test acc (%)", "pct"),
    ("seen_acc", "seen acc (%)", "pct"),
    ("unseen_acc", "unseen acc (%)", "pct"),
    ("test_acc_corrected", "test acc corrected (%)", "pct"),
    ("unseen_acc_corrected", "unseen acc corrected (%)", "pct"),
    ("bias_shift", "bias shift (logits)", "logit"),
)

METHOD_DESCRIPTIONS = {
    "scratch_full": "trained from scratch with cross-entropy on the full training set (all classes)",
    "scratch_transfer": "trained from scratch with cross-entropy on the transfer set (dropped classes absent)",
    "kd": "knowledge distillation (Hinton et al. 2015) on the transfer set",
    "fitnet": "FitNet (Romero et al. 2015) hint-based distillation on the transfer set",
    "extended_kd": "Extended-KD (Yuan & Pan 2019) on the transfer set",
    "dkd": "decoupled knowledge distillation (Zhao et al. 2022) on the transfer set",
}


# ----------------------------------------------------------------------------------------------
# number formatting


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def fmt_pct(value: Any) -> str:
    """A fraction as a percentage with one decimal; `n/a` when missing."""
    if not _is_num(value):
        return "n/a"
    return f"{value * 100:.1f}"


def fmt_stat(stat: Any, kind: str = "pct") -> str:
    """`{"mean": m, "std": s}` as `"m ± s"` (percent, 1 decimal) or, for kind="logit", 2 decimals."""
    if _is_num(stat):
        stat = {"mean": stat}
    if not isinstance(stat, dict) or not _is_num(stat.get("mean")):
        return "n/a"
    mean, std = stat["mean"], stat.get("std")
    if kind == "pct":
        text = f"{mean * 100:.1f}"
        if _is_num(std):
            text += f" ± {std * 100:.1f}"
    else:
        text = f"{mean:+.2f}"
        if _is_num(std):
            text += f" ± {std:.2f}"
    return text


def fmt_seconds(seconds: Any) -> str:
    if not _is_num(seconds) or (isinstance(seconds, float) and math.isnan(seconds)):
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds:.1f} s ({seconds / 60:.1f} min)"
    return f"{seconds:.1f} s ({seconds / 3600:.2f} h)"


def _mean(values: Sequence[Any]) -> float | None:
    nums = [float(v) for v in values if _is_num(v)]
    return sum(nums) / len(nums) if nums else None


def _cell(text: Any) -> str:
    """A markdown table cell: pipes escaped, newlines flattened."""
    return str(text).replace("|", "\\|").replace("\n", " ")


# ----------------------------------------------------------------------------------------------
# helpers on the results dict


def class_names(results: dict) -> list[str]:
    dataset = results.get("dataset") or {}
    names = dataset.get("class_names")
    n = dataset.get("num_classes")
    if names:
        return [str(c) for c in names]
    if n is None:
        for method in (results.get("methods") or {}).values():
            per_class = (method.get("per_class_acc") or {}).get("mean")
            if per_class:
                n = len(per_class)
                break
    return [str(i) for i in range(int(n or 0))]


def drop_classes(results: dict) -> list[int]:
    return [int(c) for c in results.get("drop_classes") or []]


def dropped_names(results: dict) -> list[str]:
    names = class_names(results)
    return [names[c] if 0 <= c < len(names) else str(c) for c in drop_classes(results)]


def mean_wall_time_per_run(method: dict) -> float | None:
    return _mean([run.get("wall_time_s") for run in method.get("runs") or []])


# ----------------------------------------------------------------------------------------------
# sections


def _summary(results: dict) -> list[str]:
    methods: dict = results.get("methods") or {}
    teacher = results.get("teacher") or {}
    dataset = results.get("dataset") or {}
    dropped = ", ".join(f"'{n}'" for n in dropped_names(results)) or "none"
    seeds = results.get("seeds") or []

    parts = [
        f"The {teacher.get('model', '?')} teacher, trained on all {len(class_names(results))} classes of "
        f"{dataset.get('name', '?')}, reaches {fmt_pct(teacher.get('test_acc'))}% test accuracy. "
        f"Students ({results.get('student_model', '?')}) are trained with {len(methods)} method(s) "
        f"({', '.join(methods) or 'none'}), over {len(seeds)} seed(s) each; "
        + ("all but scratch_full see" if "scratch_full" in methods else "they see")
        + f" a transfer set without any image of class {dropped}."
    ]
    # scratch_full saw the dropped classes: it is the reference, not a contender.
    contenders = {n: m for n, m in methods.items() if n != "scratch_full"} or methods

    def best(key: str) -> tuple[str, dict] | None:
        scored = [
            (name, m[key])
            for name, m in contenders.items()
            if isinstance(m.get(key), dict) and _is_num(m[key].get("mean"))
        ]
        return max(scored, key=lambda item: item[1]["mean"]) if scored else None

    b = best("unseen_acc")
    if b:
        parts.append(
            f"Among the students that never saw the dropped class(es), the best accuracy on them is "
            f"{fmt_stat(b[1])}% ({b[0]}) before bias correction"
        )
        b = best("unseen_acc_corrected")
        parts[-1] += f" and {fmt_stat(b[1])}% ({b[0]}) after it." if b else "."
    b = best("test_acc_corrected")
    if b:
        parts.append(f"Their best corrected overall test accuracy is {fmt_stat(b[1])}% ({b[0]}).")
    for name in ("extended_kd", "kd"):
        m = methods.get(name)
        if m and isinstance(m.get("unseen_acc_corrected"), dict):
            parts.append(
                f"{name}: {fmt_stat(m.get('test_acc_corrected'))}% overall and "
                f"{fmt_stat(m.get('unseen_acc_corrected'))}% on the dropped class(es) after correction "
                f"({fmt_stat(m.get('test_acc'))}% and {fmt_stat(m.get('unseen_acc'))}% before)."
            )
    ref = methods.get("scratch_full")
    if ref and isinstance(ref.get("test_acc"), dict):
        parts.append(
            f"Reference: scratch_full, trained on every class, reaches {fmt_stat(ref.get('test_acc'))}% "
            f"({fmt_stat(ref.get('unseen_acc'))}% on the dropped class(es))."
        )
    parts.append("All figures are mean ± standard deviation over seeds, in percent.")
    return [" ".join(parts), ""]


def _setup(results: dict) -> list[str]:
    dataset = results.get("dataset") or {}
    teacher = results.get("teacher") or {}
    hardware = results.get("hardware") or {}
    names = class_names(results)
    dropped = drop_classes(results)

    lines = ["## Setup", ""]
    sizes = ", ".join(
        f"{label} {dataset[key]}"
        for key, label in (
            ("train_size", "train"),
            ("transfer_size", "transfer"),
            ("val_size", "validation"),
            ("test_size", "test"),
        )
        if dataset.get(key) is not None
    )
    lines.append(
        f"- **Dataset:** {dataset.get('name', '?')} (source: {dataset.get('source', '?')}), "
        f"{len(names)} classes; {sizes or 'sizes unknown'}."
    )
    if dataset.get("note"):
        lines.append(f"- **Dataset note:** {dataset['note']}")
    dropped_text = (
        ", ".join(f"'{names[c] if 0 <= c < len(names) else c}' (index {c})" for c in dropped) or "none"
    )
    lines.append(f"- **Dropped classes** (absent from the transfer set): {dropped_text}.")

    per_class = teacher.get("per_class_acc") or []
    teacher_dropped = ", ".join(
        f"'{names[c] if c < len(names) else c}' {fmt_pct(per_class[c])}%"
        for c in dropped
        if 0 <= c < len(per_class)
    )
    teacher_line = (
        f"- **Teacher:** {teacher.get('model', '?')}, test accuracy {fmt_pct(teacher.get('test_acc'))}%"
    )
    if teacher_dropped:
        teacher_line += f"; on the dropped classes: {teacher_dropped}"
    extra = []
    if teacher.get("epochs") is not None:
        extra.append(f"{teacher['epochs']} epochs")
    if teacher.get("wall_time_s") is not None:
        extra.append(f"{fmt_seconds(teacher['wall_time_s'])}")
    if teacher.get("workdir"):
        extra.append(f"workdir `{teacher['workdir']}`")
    if extra:
        teacher_line += f" ({', '.join(extra)})"
    lines.append(teacher_line + ".")

    lines.append(f"- **Student model:** {results.get('student_model', '?')}.")
    lines.append(f"- **Epochs per student:** {results.get('epochs', '?')}.")
    seeds = results.get("seeds") or []
    lines.append(f"- **Seeds:** {', '.join(str(s) for s in seeds) or 'none'}.")
    hw_parts = [
        f"platform {hardware.get('platform', '?')}",
        f"device {hardware.get('device_kind', '?')}",
        f"{hardware.get('device_count', '?')} device(s)",
        f"{hardware.get('process_count', '?')} process(es)",
    ]
    if hardware.get("cpu_count") is not None:
        hw_parts.append(f"{hardware['cpu_count']} CPU cores")
    if hardware.get("hostname"):
        hw_parts.append(f"host {hardware['hostname']}")
    lines.append(f"- **Hardware:** {', '.join(hw_parts)}.")
    lines.append(f"- **Total wall time:** {fmt_seconds(results.get('wall_time_s'))}.")
    if results.get("command"):
        lines += ["- **Command:**", "", "  ```", f"  {results['command']}", "  ```"]
    lines.append("")
    return lines


def _bias_correction(results: dict) -> list[str]:
    bias = results.get("bias_correction") or {}
    lines = ["## Bias correction", ""]
    text = (
        "A student trained without the dropped classes under-predicts them. One scalar is added to "
        "the logits of the never-seen classes; it is chosen without test labels."
    )
    lines.append(text)
    lines.append("")
    lines.append(f"- **Method:** {bias.get('method', '?')}")
    if bias.get("description"):
        lines.append(f"- **How:** {bias['description']}")
    lines.append("")
    return lines


def main_table(results: dict) -> list[str]:
    methods: dict = results.get("methods") or {}
    header = ["method"] + [label for _, label, _ in MAIN_COLUMNS] + ["wall time / run (s)"]
    lines = [
        MAIN_TABLE_BEGIN,
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for name, method in methods.items():
        cells = [_cell(name)]
        cells += [fmt_stat(method.get(key), kind) for key, _, kind in MAIN_COLUMNS]
        wall = mean_wall_time_per_run(method)
        cells.append(f"{wall:.1f}" if wall is not None else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(MAIN_TABLE_END)
    return lines


def _results_section(results: dict) -> list[str]:
    methods: dict = results.get("methods") or {}
    lines = ["## Results", ""]
    lines.append(
        "Accuracies in percent, mean ± standard deviation over seeds. *Seen*: test images of the classes "
        "in the transfer set; *unseen*: test images of the dropped classes. *Corrected*: after the bias "
        "correction. The bias shift is in logits."
    )
    lines.append("")
    lines += main_table(results)
    lines.append("")
    described = [
        f"- `{name}`: {METHOD_DESCRIPTIONS[name]}"
        + (f" (loss `{m['loss']}`" if m.get("loss") else "")
        + (f", segment weight {m['segment_weight']}" if m.get("segment_weight") is not None else "")
        + (")" if m.get("loss") else "")
        for name, m in methods.items()
        if name in METHOD_DESCRIPTIONS
    ]
    others = [
        f"- `{name}`: loss `{m.get('loss', '?')}`"
        + (f", segment weight {m['segment_weight']}" if m.get("segment_weight") is not None else "")
        for name, m in methods.items()
        if name not in METHOD_DESCRIPTIONS
    ]
    if described or others:
        lines += ["Methods:", ""] + described + others + [""]
    return lines


def _fmt_score(score: Any, criterion: str) -> str:
    if not _is_num(score):
        return "n/a"
    if "acc" in criterion and 0.0 <= score <= 1.0:
        return f"{score * 100:.2f}"
    return f"{score:.4f}"


def _grid(results: dict) -> list[str]:
    grid: dict = results.get("grid") or {}
    if not grid:
        return []
    lines = ["## Weight selection", ""]
    lines.append(
        "The loss weight of each method below was chosen on the validation set; the row marked "
        "**chosen** was used for the final runs."
    )
    lines.append("")
    for name, entry in grid.items():
        criterion = str(entry.get("criterion", "score"))
        unit = " (%)" if "acc" in criterion else ""
        weights = entry.get("weights") or []
        scores = entry.get("scores") or []
        chosen = entry.get("chosen")
        lines.append(f"### {name}")
        lines.append("")
        lines.append(f"| weight | {criterion}{unit} | chosen |")
        lines.append("|---:|---:|:---:|")
        for i, weight in enumerate(weights):
            score = scores[i] if i < len(scores) else None
            is_chosen = (
                chosen is not None
                and _is_num(weight)
                and _is_num(chosen)
                and math.isclose(float(weight), float(chosen), rel_tol=1e-9, abs_tol=1e-12)
            )
            lines.append(
                f"| {weight:g} | {_fmt_score(score, criterion)} | {'**chosen**' if is_chosen else ''} |"
                if _is_num(weight)
                else f"| {weight} | {_fmt_score(score, criterion)} | {'**chosen**' if weight == chosen else ''} |"
            )
        lines.append("")
        lines.append(f"Chosen weight for {name}: **{chosen}**.")
        lines.append("")
    return lines


def _per_class_table(results: dict, key: str, title: str) -> list[str]:
    methods: dict = results.get("methods") or {}
    names = class_names(results)
    dropped = set(drop_classes(results))
    header = ["method"] + [f"{n}*" if i in dropped else n for i, n in enumerate(names)]
    lines = [f"### {title}", ""]
    lines.append("| " + " | ".join(_cell(h) for h in header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * len(names)) + "|")
    teacher_pc = (results.get("teacher") or {}).get("per_class_acc")
    if teacher_pc:
        lines.append(
            "| teacher | "
            + " | ".join(fmt_pct(teacher_pc[i]) if i < len(teacher_pc) else "n/a" for i in range(len(names)))
            + " |"
        )
    for name, method in methods.items():
        pc = method.get(key) or {}
        means, stds = pc.get("mean") or [], pc.get("std") or []
        cells = []
        for i in range(len(names)):
            stat = {"mean": means[i] if i < len(means) else None, "std": stds[i] if i < len(stds) else None}
            cells.append(fmt_stat(stat))
        lines.append(f"| {_cell(name)} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _per_class(results: dict) -> list[str]:
    lines = ["## Per-class accuracy", ""]
    lines.append(
        "Test accuracy per class in percent (mean ± std over seeds); classes marked `*` were dropped "
        "from the transfer set. The teacher row is a single run."
    )
    lines.append("")
    lines += _per_class_table(results, "per_class_acc_corrected", "After bias correction")
    lines += _per_class_table(results, "per_class_acc", "Before bias correction")
    return lines


def _plots(results: dict) -> list[str]:
    from extkd_jax.experiment.plots import plot_filenames

    captions = {
        "per_class_accuracy.png": "Per-class test accuracy after bias correction (dropped classes shaded)",
        "per_class_accuracy_uncorrected.png": "Per-class test accuracy before bias correction",
        "unseen_accuracy.png": "Accuracy on the dropped classes before vs after bias correction",
        "training_curves.png": "Test accuracy and training loss per epoch (mean over seeds)",
    }
    lines = ["## Plots", ""]
    for filename in plot_filenames(results):
        caption = captions.get(filename)
        if caption is None and filename.startswith("confusion_"):
            method = filename[len("confusion_") : -len(".png")]
            caption = f"Confusion matrix of {method} after bias correction (seed {_first_seed(results)}, row-normalised)"
        caption = caption or filename
        lines.append(f"- `{filename}`: {caption}")
        lines.append("")
        lines.append(f"  ![{caption}]({filename})")
        lines.append("")
    return lines


def _first_seed(results: dict) -> Any:
    seeds = results.get("seeds") or [0]
    return seeds[0]


def _runs(results: dict) -> list[str]:
    methods: dict = results.get("methods") or {}
    lines = ["## Runs", ""]
    lines.append("| method | seed | workdir | wall time (s) | epochs |")
    lines.append("|---|---:|---|---:|---:|")
    teacher = results.get("teacher") or {}
    if teacher:
        wall = teacher.get("wall_time_s")
        lines.append(
            f"| teacher | - | `{teacher.get('workdir', '?')}` | "
            f"{f'{wall:.1f}' if _is_num(wall) else 'n/a'} | {teacher.get('epochs', 'n/a')} |"
        )
    for name, method in methods.items():
        for run in method.get("runs") or []:
            wall = run.get("wall_time_s")
            lines.append(
                f"| {_cell(name)} | {run.get('seed', '?')} | `{run.get('workdir', '?')}` | "
                f"{f'{wall:.1f}' if _is_num(wall) else 'n/a'} | {run.get('epochs', 'n/a')} |"
            )
    lines.append("")
    return lines


# ----------------------------------------------------------------------------------------------


def render_report(results: dict) -> str:
    """The markdown text of the report."""
    lines = [f"# Dark-knowledge experiment: {results.get('preset', '?')}", ""]
    lines += ["## Summary", ""] + _summary(results)
    lines += _setup(results)
    lines += _bias_correction(results)
    lines += _results_section(results)
    lines += _grid(results)
    lines += _per_class(results)
    lines += _plots(results)
    lines += _runs(results)
    return "\n".join(lines).rstrip() + "\n"


def write_report(results: dict, workdir: str | Path) -> Path:
    """Writes `workdir/report.md` and returns its path."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "report.md"
    path.write_text(render_report(results), encoding="utf-8")
    return path


def parse_main_table(text: str) -> dict[str, dict[str, str]]:
    """The main table of a report as {method: {column header: cell text}} (for tests and tools)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    header = [c.strip() for c in lines[start].strip().strip("|").split("|")]
    table: dict[str, dict[str, str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        table[cells[0]] = dict(zip(header[1:], cells[1:]))
    return table
