"""PNG figures of `extkd reproduce`, drawn from a `Results` and each run's metrics log (matplotlib, the [plots]
extra). `write_plots` returns {figure name: file name} of what it wrote; the report links exactly those."""

from __future__ import annotations

import io
import logging

import numpy as np
from etils import epath

from extkd_jax.experiment.results import Results
from extkd_jax.train.metrics import read_metrics

log = logging.getLogger(__name__)

DROPPED_COLOR = "#f4cccc"
DPI = 120


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'extkd_jax[plots]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: epath.Path) -> None:
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    path.write_bytes(buffer.getvalue())


def _shade_dropped(ax, results: Results) -> None:
    for i, c in enumerate(results.drop_classes):
        ax.axvspan(c - 0.5, c + 0.5, color=DROPPED_COLOR, zorder=0, label="dropped class" if i == 0 else None)


def per_class(plt, results: Results, corrected: bool):
    names = results.class_names
    x = np.arange(len(names))
    methods = list(results.methods.values())
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.25 * len(names) * max(len(methods), 1) + 3), 4.8))
    for j, m in enumerate(methods):
        mean, std = m.per_class(corrected)
        ax.bar(
            x - 0.4 + width * (j + 0.5),
            np.asarray(mean) * 100,
            width,
            yerr=None if std is None else np.asarray(std) * 100,
            capsize=2,
            label=f"{m.name} (n={len(m.runs)})",
            color=plt.get_cmap("tab10")(j % 10),
        )
    ax.scatter(
        x,
        np.asarray(results.teacher["per_class_acc"]) * 100,
        marker="_",
        s=300,
        color="black",
        zorder=5,
        label="teacher",
    )
    _shade_dropped(ax, results)
    ax.set_xticks(x)
    ax.set_xticklabels(
        [f"{n}*" if i in results.drop_classes else n for i, n in enumerate(names)],
        rotation=0 if len(names) <= 12 else 60,
    )
    ax.set_ylim(0, 105)
    ax.set_xlabel("class (* = dropped from the transfer set)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(
        f"{results.preset}: per-class accuracy, {'after' if corrected else 'before'} bias correction"
        " (bars: mean; error bars: sample std over seeds)"
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    return fig


def unseen(plt, results: Results):
    methods = list(results.methods.values())
    x = np.arange(len(methods))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(methods) + 2), 4.5))
    for offset, metric, label, color in (
        (-0.2, "unseen_acc", "before correction", "#9fc5e8"),
        (0.2, "unseen_acc_corrected", "after correction", "#1c4587"),
    ):
        stats = [m.stat(metric) for m in methods]
        bars = ax.bar(
            x + offset,
            [s.mean * 100 for s in stats],
            0.38,
            label=label,
            color=color,
            capsize=3,
            yerr=[(s.std or 0.0) * 100 for s in stats],
        )
        for bar, s in zip(bars, stats, strict=True):
            ax.text(
                bar.get_x() + bar.get_width() / 2, s.mean * 100 + 1.5, f"{s.mean * 100:.1f}", ha="center", fontsize=8
            )
    ax.set_xticks(x)
    ax.set_xticklabels([f"{m.name}\n(n={len(m.runs)})" for m in methods])
    ax.set_ylim(0, 112)
    ax.set_ylabel("accuracy on the dropped classes (%)")
    ax.set_title(f"{results.preset}: never-seen class(es) {', '.join(results.dropped_names)}")
    ax.legend(loc="upper left", fontsize=9)
    return fig


def training_curves(plt, results: Results, workdir: epath.Path):
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = [("teacher", [read_metrics(workdir / "teacher")], "black")]
    series += [
        (
            f"{m.name} (n={len(m.runs)})",
            [read_metrics(workdir / r.workdir) for r in m.runs],
            plt.get_cmap("tab10")(j % 10),
        )
        for j, m in enumerate(results.methods.values())
    ]
    for label, runs, color in series:
        runs = [r for r in runs if r]
        if not runs:
            continue
        for ax, key, scale in ((ax_acc, "test_acc", 100.0), (ax_loss, "train_loss", 1.0)):
            length = min(len(r) for r in runs)
            values = np.asarray([[rec.get(key, np.nan) for rec in r[:length]] for r in runs], np.float64) * scale
            epochs = [rec["epoch"] for rec in runs[0][:length]]
            ax.plot(epochs, values.mean(0), label=label, color=color, linestyle="--" if label == "teacher" else "-")
            if len(runs) > 1:
                ax.fill_between(epochs, values.min(0), values.max(0), color=color, alpha=0.15)
    ax_acc.set(title="test accuracy before correction (band: min..max over seeds)", xlabel="epoch", ylabel="%")
    ax_loss.set(title="training loss", xlabel="epoch", ylabel="loss")
    if ax_acc.get_legend_handles_labels()[0]:
        ax_acc.legend(fontsize=8)
    return fig


def confusion(plt, results: Results, method: str):
    counts = np.asarray(results.methods[method].runs[0].confusion_corrected, np.float64)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    names = results.class_names
    ax.set_xticks(range(len(names)), names, rotation=60, fontsize=8)
    ax.set_yticks(
        range(len(names)), [f"{n}*" if i in results.drop_classes else n for i, n in enumerate(names)], fontsize=8
    )
    if len(names) <= 20:
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(
                    j,
                    i,
                    f"{rates[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
    ax.set(
        xlabel="predicted",
        ylabel="true (* = dropped)",
        title=f"{method}, seed {results.methods[method].runs[0].seed}, after correction",
    )
    fig.colorbar(image, ax=ax, fraction=0.046)
    return fig


def keep_fraction_curve(plt, results: Results):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for j, method in enumerate(dict.fromkeys(p.method for p in results.curve)):
        points = sorted((p for p in results.curve if p.method == method), key=lambda p: p.keep_fraction)
        x = [p.keep_fraction * 100 for p in points]
        for metric, style in (("unseen_acc_corrected", "-o"), ("unseen_acc", ":x")):
            stats = [getattr(p, metric) for p in points]
            ax.errorbar(
                x,
                [s.mean * 100 for s in stats],
                yerr=[(s.std or 0) * 100 for s in stats],
                fmt=style,
                color=plt.get_cmap("tab10")(j % 10),
                capsize=3,
                label=f"{method}{'' if metric.endswith('corrected') else ' (before correction)'}",
            )
    ax.set_xscale("symlog", linthresh=0.5)
    ax.set(
        xlabel="examples of the dropped class kept in the transfer set (%)",
        ylabel="accuracy on the dropped class (%)",
        ylim=(0, 102),
        title=f"{results.preset}: how many labelled examples does the teacher's dark knowledge replace?",
    )
    ax.legend(fontsize=8)
    return fig


def write_plots(results: Results, workdir: epath.Path) -> dict[str, str]:
    """Writes the figures into `workdir`; returns {figure: file name}. Missing matplotlib: a warning, no plots."""
    try:
        plt = _pyplot()
    except ImportError as err:
        log.warning("%s", err)
        return {}
    if not results.methods:  # every method diverged: nothing to draw
        return {}
    featured = "extended_kd" if "extended_kd" in results.methods else list(results.methods)[-1]
    figures = {
        "per_class_accuracy.png": lambda: per_class(plt, results, corrected=True),
        "per_class_accuracy_uncorrected.png": lambda: per_class(plt, results, corrected=False),
        "unseen_accuracy.png": lambda: unseen(plt, results),
        "training_curves.png": lambda: training_curves(plt, results, workdir),
        f"confusion_{featured}.png": lambda: confusion(plt, results, featured),
    }
    if results.curve:
        figures["keep_fraction_curve.png"] = lambda: keep_fraction_curve(plt, results)
    written = {}
    for name, draw in figures.items():
        _save(plt, draw(), workdir / name)
        written[name.removesuffix(".png")] = name
    return written
