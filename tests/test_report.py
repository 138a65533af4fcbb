"""report.md and the PNG figures of `extkd reproduce`, from a synthetic results dict."""

from __future__ import annotations

import json
import re

import pytest

from extkd_jax.experiment.plots import plot_filenames, write_plots
from extkd_jax.experiment.report import MAIN_COLUMNS, parse_main_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASS_NAMES = ["cat", "dog", "frog", "ship"]
DROP = [2]
SEEDS = [0, 1]


def _stat(runs):
    mean = sum(runs) / len(runs)
    std = (sum((r - mean) ** 2 for r in runs) / len(runs)) ** 0.5
    return {"mean": mean, "std": std, "runs": list(runs)}


def _method(name, base, unseen, unseen_corr, shift):
    pc = [base + 0.01 * i for i in range(4)]
    pc[DROP[0]] = unseen
    pcc = list(pc)
    pcc[DROP[0]] = unseen_corr
    return {
        "test_acc": _stat([base, base + 0.004]),
        "seen_acc": _stat([base + 0.02, base + 0.026]),
        "unseen_acc": _stat([unseen, unseen + 0.01]),
        "test_acc_corrected": _stat([base + 0.05, base + 0.0567]),
        "seen_acc_corrected": _stat([base + 0.03, base + 0.031]),
        "unseen_acc_corrected": _stat([unseen_corr, unseen_corr + 0.0333]),
        "bias_shift": _stat([shift, shift + 0.5]),
        "per_class_acc": {"mean": pc, "std": [0.01] * 4},
        "per_class_acc_corrected": {"mean": pcc, "std": [0.02] * 4},
        "confusion": [[90, 5, 0, 5], [4, 92, 0, 4], [40, 30, 2, 28], [3, 3, 0, 94]],
        "confusion_corrected": [[88, 5, 3, 4], [4, 90, 2, 4], [10, 8, 75, 7], [3, 3, 1, 93]],
        "segment_weight": 1.0 if name == "extended_kd" else None,
        "loss": name,
        "runs": [
            {"seed": s, "workdir": f"runs/{name}/seed_{s}", "wall_time_s": 10.0 + 2.5 * s, "epochs": 3}
            for s in SEEDS
        ],
    }


@pytest.fixture
def results():
    return {
        "preset": "synthetic_omit2",
        "command": "extkd reproduce --config=configs/synthetic.py --workdir=/tmp/x",
        "dataset": {
            "name": "synthetic",
            "source": "npz",
            "note": "made-up numbers for a test",
            "num_classes": 4,
            "class_names": CLASS_NAMES,
            "train_size": 400,
            "transfer_size": 300,
            "val_size": 50,
            "test_size": 100,
        },
        "drop_classes": DROP,
        "hardware": {
            "platform": "cpu",
            "device_kind": "cpu",
            "device_count": 1,
            "process_count": 1,
            "hostname": "testhost",
            "cpu_count": 2,
        },
        "teacher": {
            "model": "mlp",
            "test_acc": 0.9712,
            "per_class_acc": [0.98, 0.97, 0.955, 0.98],
            "epochs": 3,
            "wall_time_s": 12.0,
            "workdir": "teacher",
        },
        "student_model": "mlp",
        "seeds": SEEDS,
        "epochs": 3,
        "bias_correction": {
            "method": "validation",
            "description": "shift chosen to maximise accuracy on the validation images",
        },
        "grid": {
            "extended_kd": {
                "weights": [0.1, 1.0, 10.0],
                "scores": [0.81, 0.8567, 0.79],
                "chosen": 1.0,
                "criterion": "val_acc_corrected",
            }
        },
        "methods": {
            "kd": _method("kd", 0.7123, 0.0, 0.6145, 3.25),
            "extended_kd": _method("extended_kd", 0.7456, 0.05, 0.8051, 1.75),
        },
        "wall_time_s": 123.4,
    }


def _write_metrics(path, epochs=3, offset=0.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps(
            {
                "epoch": e,
                "train_loss": 2.0 / e + offset,
                "test_acc": 0.5 + 0.1 * e - offset,
                "val_acc": 0.5,
                "learning_rate": 0.1,
            }
        )
        for e in range(1, epochs + 1)
    ]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def workdir(tmp_path, results):
    _write_metrics(tmp_path / "teacher" / "metrics.jsonl")
    for method in results["methods"].values():
        for run in method["runs"]:
            _write_metrics(tmp_path / run["workdir"] / "metrics.jsonl", offset=0.01 * run["seed"])
    return tmp_path


def test_report_main_table_matches_results(results, workdir):
    path = write_report(results, workdir)
    assert path == workdir / "report.md" and path.is_file()
    text = path.read_text()
    assert text.startswith("# ") and "synthetic_omit2" in text.splitlines()[0]
    table = parse_main_table(text)
    assert list(table) == list(results["methods"])
    for name, row in table.items():
        method = results["methods"][name]
        for key, label, kind in MAIN_COLUMNS:
            m = re.fullmatch(r"([+-]?\d+\.\d+) ± (\d+\.\d+)", row[label])
            assert m, (name, label, row[label])
            if kind == "pct":
                assert float(m.group(1)) == round(method[key]["mean"] * 100, 1)
                assert float(m.group(2)) == round(method[key]["std"] * 100, 1)
            else:
                assert float(m.group(1)) == round(method[key]["mean"], 2)
        wall = [r["wall_time_s"] for r in method["runs"]]
        assert float(row["wall time / run (s)"]) == round(sum(wall) / len(wall), 1)


def test_report_contents(results, workdir):
    text = write_report(results, workdir).read_text()
    # dropped class by name, in the setup and marked in the per-class table header
    assert "'frog'" in text
    assert re.search(r"^\| method \| cat \| dog \| frog\* \| ship \|$", text, re.MULTILINE)
    assert "made-up numbers for a test" in text
    assert results["command"] in text
    assert results["bias_correction"]["description"] in text
    # grid: every weight, its score in percent, the chosen one marked
    grid_rows = re.findall(r"^\| ([\d.]+) \| ([\d.]+) \| (\**chosen\**)? ?\|$", text, re.MULTILINE)
    assert [float(w) for w, _, _ in grid_rows] == [0.1, 1.0, 10.0]
    assert [float(w) for w, _, mark in grid_rows if mark] == [1.0]
    assert [float(s) for _, s, _ in grid_rows] == [81.0, 85.67, 79.0]
    # plots embedded, runs listed
    for filename in plot_filenames(results):
        assert f"]({filename})" in text
    assert "confusion_extended_kd.png" in plot_filenames(results)
    for method in results["methods"].values():
        for run in method["runs"]:
            assert f"`{run['workdir']}`" in text


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 1024, path


def test_plots_written(results, workdir):
    paths = write_plots(results, workdir)
    assert [p.name for p in paths] == plot_filenames(results)
    assert {p.name for p in paths} >= {
        "per_class_accuracy.png",
        "per_class_accuracy_uncorrected.png",
        "training_curves.png",
        "confusion_extended_kd.png",
        "unseen_accuracy.png",
    }
    for path in paths:
        assert path.parent == workdir
        _assert_png(path)


def test_plots_survive_missing_metrics_and_no_extended_kd(results, workdir):
    (workdir / "runs" / "kd" / "seed_1" / "metrics.jsonl").unlink()
    (workdir / "runs" / "kd" / "seed_0" / "metrics.jsonl").write_text("not json\n")
    del results["methods"]["extended_kd"]
    results["methods"]["kd"]["runs"].append({"seed": 9, "workdir": "runs/kd/never_ran"})
    paths = write_plots(results, workdir)
    names = [p.name for p in paths]
    assert "training_curves.png" in names and "confusion_kd.png" in names
    for path in paths:
        _assert_png(path)
