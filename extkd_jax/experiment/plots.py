"""PNG figures for `extkd reproduce`, drawn from the `results` dict and each run's `metrics.jsonl`.

Files (in the experiment workdir):
  per_class_accuracy.png              per-class test accuracy after bias correction, every method
  per_class_accuracy_uncorrected.png  the same before correction
  unseen_accuracy.png                 accuracy on the dropped classes, before vs after correction
  training_curves.png                 test accuracy and training loss vs epoch, mean over seeds
  confusion_<method>.png              row-normalised confusion matrix after correction (seed-0 run) of
                                      extended_kd, or of the last method when extended_kd is absent
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

log = logging.getLogger(__name__)

DROPPED_COLOR = "#f4cccc"
DPI = 120


def _class_names(results: dict) -> list[str]:
    from extkd_jax.experiment.report import class_names

    return class_names(results)


def _dropped(results: dict) -> list[int]:
    return [int(c) for c in results.get("drop_classes") or []]


def confusion_method(results: dict) -> str | None:
    """The method whose confusion matrix is drawn: extended_kd, else the last method present."""
    methods = list((results.get("methods") or {}).keys())
    if not methods:
        return None
    return "extended_kd" if "extended_kd" in methods else methods[-1]


def plot_filenames(results: dict) -> list[str]:
    """The file names `write_plots` writes for these results, in order."""
    names = [
        "per_class_accuracy.png",
        "per_class_accuracy_uncorrected.png",
        "unseen_accuracy.png",
        "training_curves.png",
    ]
    method = confusion_method(results)
    if method is not None:
        names.append(f"confusion_{method}.png")
    return names


def _num(x) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else float("nan")


def _save(fig, path: Path) -> Path:
    try:
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _shade_dropped(ax, dropped: list[int], n_classes: int, label_y: float) -> None:
    for i, c in enumerate(dropped):
        if 0 <= c < n_classes:
            ax.axvspan(
                c - 0.5,
                c + 0.5,
                color=DROPPED_COLOR,
                zorder=0,
                label="dropped class (not in transfer set)" if i == 0 else None,
            )
            ax.text(
                c,
                label_y,
                "dropped",
                ha="center",
                va="bottom",
                fontsize=8,
                color="#a61c00",
                fontweight="bold",
            )


def _per_class_figure(results: dict, key: str, title: str, path: Path) -> Path:
    names = _class_names(results)
    n = len(names)
    methods = results.get("methods") or {}
    dropped = _dropped(results)
    width_in = min(max(8.0, 0.22 * n * max(len(methods), 1) + 3), 40.0)
    fig, ax = plt.subplots(figsize=(width_in, 4.8))
    x = np.arange(n)
    k = max(len(methods), 1)
    bar_w = 0.8 / k
    cmap = plt.get_cmap("tab10")
    for j, (name, method) in enumerate(methods.items()):
        pc = method.get(key) or {}
        means = np.array([_num(v) for v in (pc.get("mean") or [])][:n] + [np.nan] * n)[:n] * 100
        stds = np.array([_num(v) for v in (pc.get("std") or [])][:n] + [0.0] * n)[:n] * 100
        stds = np.nan_to_num(stds)
        ax.bar(
            x - 0.4 + bar_w * (j + 0.5),
            means,
            bar_w,
            yerr=stds,
            capsize=2 if n <= 20 else 0,
            label=name,
            color=cmap(j % 10),
            error_kw={"elinewidth": 0.8},
        )
    teacher_pc = (results.get("teacher") or {}).get("per_class_acc")
    if teacher_pc:
        t = np.array([_num(v) for v in teacher_pc][:n] + [np.nan] * n)[:n] * 100
        ax.scatter(
            x,
            t,
            marker="_",
            s=max(300 / max(n / 10, 1), 40),
            color="black",
            linewidths=2,
            zorder=5,
            label="teacher",
        )
    ax.set_ylim(0, 112)
    _shade_dropped(ax, dropped, n, 102.5)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xticks(x)
    labels = [f"{name}*" if i in dropped else name for i, name in enumerate(names)]
    ax.set_xticklabels(
        labels,
        rotation=0 if n <= 12 and max((len(s) for s in labels), default=0) <= 6 else 60,
        ha="center" if n <= 12 else "right",
        fontsize=9,
    )
    for i, tick in enumerate(ax.get_xticklabels()):
        if i in dropped:
            tick.set_color("#a61c00")
            tick.set_fontweight("bold")
    ax.set_xlabel("class (* = dropped from the transfer set)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{results.get('preset', '')}: {title}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    return _save(fig, path)


def _unseen_figure(results: dict, path: Path) -> Path:
    methods = results.get("methods") or {}
    names = list(methods)
    x = np.arange(len(names))

    def stat(m, key):
        s = methods[m].get(key) or {}
        return _num(s.get("mean")) * 100, np.nan_to_num(_num(s.get("std"))) * 100

    before = [stat(m, "unseen_acc") for m in names]
    after = [stat(m, "unseen_acc_corrected") for m in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(names) + 2), 4.5))
    w = 0.38
    b1 = ax.bar(
        x - w / 2,
        [b[0] for b in before],
        w,
        yerr=[b[1] for b in before],
        capsize=3,
        label="before correction",
        color="#9fc5e8",
    )
    b2 = ax.bar(
        x + w / 2,
        [a[0] for a in after],
        w,
        yerr=[a[1] for a in after],
        capsize=3,
        label="after correction",
        color="#1c4587",
    )
    for bars, vals in ((b1, before), (b2, after)):
        for bar, (m, s) in zip(bars, vals):
            if not math.isnan(m):
                ax.text(
                    bar.get_x() + bar.get_width() / 2,
                    m + s + 1.5,
                    f"{m:.1f}",
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
    dropped_names = ", ".join(
        _class_names(results)[c] for c in _dropped(results) if c < len(_class_names(results))
    )
    ax.set_xticks(x)
    ax.set_xticklabels(
        names, rotation=20 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center"
    )
    ax.set_ylim(0, 115)
    ax.set_ylabel("accuracy on dropped classes (%)")
    ax.set_title(
        f"{results.get('preset', '')}: never-seen class(es) {dropped_names or '-'} (mean ± std over seeds)"
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    return _save(fig, path)


def read_metrics(path: Path) -> list[dict]:
    """The epoch records of a metrics.jsonl; [] when missing; unreadable lines skipped."""
    records: list[dict] = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return records
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _curve(records_per_run: list[list[dict]], key: str):
    """(epochs, mean, std) over runs, aligned on the epoch number."""
    by_epoch: dict[float, list[float]] = {}
    for records in records_per_run:
        for i, r in enumerate(records):
            v = _num(r.get(key))
            if math.isnan(v):
                continue
            epoch = _num(r.get("epoch", i + 1))
            if math.isnan(epoch):
                epoch = float(i + 1)
            by_epoch.setdefault(epoch, []).append(v)
    if not by_epoch:
        return None
    epochs = np.array(sorted(by_epoch))
    vals = [np.array(by_epoch[e]) for e in epochs]
    return epochs, np.array([v.mean() for v in vals]), np.array([v.std() for v in vals])


def _resolve(workdir: Path, run_dir) -> Path:
    p = Path(str(run_dir))
    return p if p.is_absolute() else workdir / p


def _training_figure(results: dict, workdir: Path, path: Path) -> Path:
    methods = results.get("methods") or {}
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("tab10")
    drawn = 0
    series = []
    teacher = results.get("teacher") or {}
    if teacher.get("workdir"):
        records = read_metrics(_resolve(workdir, teacher["workdir"]) / "metrics.jsonl")
        if records:
            series.append(("teacher", [records], {"color": "black", "linestyle": "--"}))
    for j, (name, method) in enumerate(methods.items()):
        runs = []
        for run in method.get("runs") or []:
            if not run.get("workdir"):
                continue
            metrics_path = _resolve(workdir, run["workdir"]) / "metrics.jsonl"
            records = read_metrics(metrics_path)
            if records:
                runs.append(records)
            else:
                log.info("training curves: no metrics at %s", metrics_path)
        if runs:
            series.append((f"{name} (n={len(runs)})", runs, {"color": cmap(j % 10)}))
    for label, runs, style in series:
        for ax, key, scale in ((ax_acc, "test_acc", 100.0), (ax_loss, "train_loss", 1.0)):
            curve = _curve(runs, key)
            if curve is None:
                continue
            epochs, mean, std = curve
            ax.plot(
                epochs,
                mean * scale,
                label=label,
                marker="o" if len(epochs) <= 15 else None,
                markersize=3,
                **style,
            )
            if len(runs) > 1:
                ax.fill_between(
                    epochs, (mean - std) * scale, (mean + std) * scale, alpha=0.15, color=style["color"]
                )
            drawn += 1
    ax_acc.set_title("test accuracy (mean ± std over seeds)")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy (%), before bias correction")
    ax_loss.set_title("training loss (mean ± std over seeds)")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("train loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if drawn:
        handles, labels = ax_acc.get_legend_handles_labels()
        if not handles:
            handles, labels = ax_loss.get_legend_handles_labels()
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9, frameon=False)
    else:
        for ax in (ax_acc, ax_loss):
            ax.text(
                0.5,
                0.5,
                "no metrics.jsonl found",
                ha="center",
                va="center",
                transform=ax.transAxes,
                fontsize=11,
                color="gray",
            )
    fig.suptitle(f"{results.get('preset', '')}: training curves")
    fig.tight_layout()
    return _save(fig, path)


def _confusion_figure(results: dict, method_name: str, path: Path) -> Path:
    method = (results.get("methods") or {}).get(method_name) or {}
    names = _class_names(results)
    dropped = _dropped(results)
    cm = method.get("confusion_corrected")
    corrected = True
    if cm is None:
        cm, corrected = method.get("confusion"), False
    n = len(names)
    cm = np.array(cm if cm is not None else np.zeros((n, n)), dtype=float)
    if cm.ndim != 2 or cm.size == 0:
        cm = np.zeros((n, n))
    n = cm.shape[0]
    names = (names + [str(i) for i in range(len(names), n)])[:n]
    row_sums = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, row_sums, out=np.zeros_like(cm), where=row_sums > 0)
    size = min(max(5.5, 0.55 * n + 2.5), 24.0)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(norm * 100, cmap="Blues", vmin=0, vmax=100)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("% of the true class's test images")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                value = norm[i, j] * 100
                ax.text(
                    j,
                    i,
                    f"{value:.0f}" if value >= 0.5 or cm[i, j] == 0 else "<1",
                    ha="center",
                    va="center",
                    fontsize=8 if n <= 12 else 6,
                    color="white" if value > 55 else "black",
                )
    for c in dropped:
        if 0 <= c < n:
            ax.add_patch(Rectangle((-0.5, c - 0.5), n, 1, fill=False, edgecolor="#cc0000", linewidth=2))
    labels = [f"{name}*" if i in dropped else name for i, name in enumerate(names)]
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(labels, rotation=0 if n <= 12 else 90, fontsize=9 if n <= 20 else 6)
    ax.set_yticklabels(labels, fontsize=9 if n <= 20 else 6)
    for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
        for i, tick in enumerate(ticks):
            if i in dropped:
                tick.set_color("#cc0000")
                tick.set_fontweight("bold")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (* = dropped, outlined in red)")
    seed = (results.get("seeds") or [0])[0]
    ax.set_title(
        f"{method_name}: confusion {'after' if corrected else 'before'} bias correction\n"
        f"(seed {seed}, row-normalised %)"
    )
    return _save(fig, path)


def write_plots(results: dict, workdir: str | Path) -> list[Path]:
    """Draws every figure into `workdir`; returns the paths written. A figure that fails is logged
    and skipped, so one bad entry does not cost the others."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    jobs = [
        (
            "per_class_accuracy.png",
            lambda p: _per_class_figure(
                results, "per_class_acc_corrected", "per-class test accuracy after bias correction", p
            ),
        ),
        (
            "per_class_accuracy_uncorrected.png",
            lambda p: _per_class_figure(
                results, "per_class_acc", "per-class test accuracy before bias correction", p
            ),
        ),
        ("unseen_accuracy.png", lambda p: _unseen_figure(results, p)),
        ("training_curves.png", lambda p: _training_figure(results, workdir, p)),
    ]
    method = confusion_method(results)
    if method is not None:
        jobs.append((f"confusion_{method}.png", lambda p: _confusion_figure(results, method, p)))
    written: list[Path] = []
    for filename, draw in jobs:
        path = workdir / filename
        try:
            written.append(draw(path))
        except Exception:
            log.exception("could not draw %s", path)
            plt.close("all")
    return written
