"""`extkd reproduce`: the dark-knowledge experiment from one config, resumable run by run.

1. the teacher trains on every class (reused when `workdir/teacher` is complete);
2. each student method trains on the transfer set (no example of `data.drop_classes`), `config.seeds` times;
   the fitnet / extended_kd segment weight is chosen on the validation split from `reproduce.segment_weight_grid`;
3. every student is evaluated on the full test set before and after a bias correction of the unseen classes;
4. `results.json`, `report.md`, PNG plots and the resolved configs are written into the workdir.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import socket
import time

import jax
import ml_collections
import numpy as np

from extkd_jax.data import channel_stats
from extkd_jax.experiment import bias_correction as bc
from extkd_jax.experiment.runs import GRID_METHODS, methods_of, student_config, teacher_config
from extkd_jax.train import sharding
from extkd_jax.train.builders import DTYPES, load_trained_model
from extkd_jax.train.loop import Evaluator, load_datasets, maybe_initialize_distributed, train_and_evaluate
from extkd_jax.train.metrics import classification_summary, confusion_matrix, read_metrics
from extkd_jax.train.steps import make_logits_fn
from extkd_jax.train.workdir import check_or_write_config, config_to_dict

log = logging.getLogger(__name__)

CLASS_NAMES = {
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}
DATASET_NOTES = {
    ("cifar10", "npz"): "CIFAR-10 copy decoded from JPEG (quality about 75, PSNR 30 dB); accuracies run "
    "1-3 points below published CIFAR-10 figures",
}


def _stats(values: list[float]) -> dict:
    arr = np.asarray(values, np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "runs": [float(v) for v in values]}


class _Predictor:
    """Logits of trained workdirs on the validation and test images (one data placement for all runs)."""

    def __init__(self, config, datasets):
        self.config, self.datasets = config, datasets
        self.mesh = sharding.make_mesh()
        self.mean, self.std = channel_stats(datasets.train)
        self._evaluators: dict[str, Evaluator] = {}

    def logits(self, workdir: pathlib.Path) -> dict[str, np.ndarray]:
        parts, config = load_trained_model(workdir, DTYPES[self.config.compute_dtype])
        key = f"{config.model.name}:{json.dumps(config.model.kwargs.to_dict(), sort_keys=True)}"
        if key not in self._evaluators:
            self._evaluators[key] = Evaluator(
                make_logits_fn(parts), self.mesh, self.config.eval_batch_size, self.mean, self.std,
                DTYPES[config.compute_dtype],
            )
        evaluator = self._evaluators[key]
        params = sharding.put_replicated(parts.params, self.mesh)
        stats = sharding.put_replicated(parts.batch_stats, self.mesh)
        return {
            split: evaluator.logits(params, stats, getattr(self.datasets, split).images)
            for split in ("val", "test")
        }


def _choose_shift(config, logits: dict, teacher_logits: dict, datasets) -> tuple[float, str]:
    classes = list(datasets.drop_classes)
    method = config.reproduce.bias_correction
    if method == "validation":
        if len(datasets.val) == 0:
            raise ValueError("reproduce.bias_correction='validation' needs data.val_size > 0")
        return bc.shift_maximizing_accuracy(logits["val"], datasets.val.labels, classes), "validation"
    split = "val" if len(datasets.val) else "test"
    target = bc.predicted_fraction(teacher_logits[split], classes)
    return bc.shift_to_match_frequency(logits[split], target, classes), split


def _describe_correction(method: str, split: str) -> str:
    if method == "validation":
        return ("one scalar added to the logits of the never-seen classes, chosen on a grid to maximise "
                "accuracy on the labeled validation split (never the test set)")
    where = "the validation split" if split == "val" else "the test set"
    return ("one scalar added to the logits of the never-seen classes, chosen so the student predicts them as "
            f"often as the teacher does on the images of {where}, without their labels")


def _evaluate_run(config, predictor, teacher_logits, datasets, run_dir: pathlib.Path) -> dict:
    logits = predictor.logits(run_dir)
    shift, split = _choose_shift(config, logits, teacher_logits, datasets)
    classes = list(datasets.drop_classes)
    test, labels = logits["test"], datasets.test.labels
    corrected = bc.shift_logits(test, classes, shift)
    before = classification_summary(test, labels, datasets.num_classes, classes)
    after = classification_summary(corrected, labels, datasets.num_classes, classes)
    val_score = float("nan")
    if len(datasets.val):
        val_corrected = bc.shift_logits(logits["val"], classes, shift)
        val_score = float((val_corrected.argmax(-1) == datasets.val.labels).mean())
    records = read_metrics(run_dir)
    return {
        "test_acc": before["acc"], "seen_acc": before.get("seen_acc", before["acc"]),
        "unseen_acc": before.get("unseen_acc", float("nan")),
        "test_acc_corrected": after["acc"], "seen_acc_corrected": after.get("seen_acc", after["acc"]),
        "unseen_acc_corrected": after.get("unseen_acc", float("nan")),
        "bias_shift": shift, "correction_split": split, "val_acc_corrected": val_score,
        "per_class_acc": before["per_class_acc"], "per_class_acc_corrected": after["per_class_acc"],
        "confusion": confusion_matrix(test, labels, datasets.num_classes).tolist(),
        "confusion_corrected": confusion_matrix(corrected, labels, datasets.num_classes).tolist(),
        "wall_time_s": records[-1]["wall_time_s"] if records else float("nan"),
        "epochs": records[-1]["epoch"] if records else 0,
    }


def _hardware() -> dict:
    device = jax.devices()[0]
    return {"platform": device.platform, "device_kind": device.device_kind, "device_count": jax.device_count(),
            "process_count": jax.process_count(), "hostname": socket.gethostname(), "cpu_count": os.cpu_count()}


def reproduce(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path, preset: str = "", command_line: str = ""
) -> dict:
    """Runs (or resumes) the whole experiment; returns the results dict also written to results.json."""
    t_start = time.time()
    maybe_initialize_distributed(config.distributed)  # before anything touches a JAX backend
    workdir = pathlib.Path(workdir).absolute()
    methods = methods_of(config)
    if config.seeds < 1:
        raise ValueError(f"seeds={config.seeds}: expected at least 1")
    if config.reproduce.bias_correction not in bc.BIAS_CORRECTIONS:
        raise ValueError(f"reproduce.bias_correction={config.reproduce.bias_correction!r}; "
                         f"expected one of {bc.BIAS_CORRECTIONS}")
    grid = tuple(float(w) for w in config.reproduce.segment_weight_grid)
    if not grid:
        raise ValueError("reproduce.segment_weight_grid is empty: give at least one weight")
    if len(grid) > 1 and config.data.val_size == 0 and any(m in GRID_METHODS for m in methods):
        raise ValueError("choosing the segment weight needs a validation split: set data.val_size > 0 "
                         "or give reproduce.segment_weight_grid a single weight")
    if not config.data.drop_classes:
        raise ValueError("data.drop_classes is empty: the experiment needs at least one class to drop")
    is_main = jax.process_index() == 0
    check_or_write_config(workdir, config, kind="reproduce", write=is_main)
    datasets = load_datasets(config.data)
    seeds = [config.seed + i for i in range(config.seeds)]

    teacher_dir = workdir / "teacher"
    train_and_evaluate(teacher_config(config), teacher_dir, mode="train")
    predictor = _Predictor(config, datasets)
    teacher_logits = predictor.logits(teacher_dir)
    teacher_summary = classification_summary(teacher_logits["test"], datasets.test.labels,
                                             datasets.num_classes, datasets.drop_classes)
    teacher_records = read_metrics(teacher_dir)

    def run(method: str, seed: int, weight: float | None) -> dict:
        name = f"runs/{method}" + (f"/w{weight:g}" if weight is not None else "") + f"/seed_{seed}"
        run_config = student_config(config, method, seed, str(teacher_dir), weight)
        log.info("reproduce: %s", name)
        train_and_evaluate(run_config, workdir / name, mode="distill" if run_config.teacher.workdir else "train")
        evaluation = _evaluate_run(config, predictor, teacher_logits, datasets, workdir / name)
        evaluation.update(seed=seed, workdir=name, config=config_to_dict(run_config))
        return evaluation

    grid_report, chosen_weight, method_runs = {}, {}, {}
    for method in methods:
        if method in GRID_METHODS:
            first_runs = {w: run(method, seeds[0], w) for w in grid}
            scores = [first_runs[w]["val_acc_corrected"] for w in grid]
            best = grid[int(np.nanargmax(scores))] if len(grid) > 1 else grid[0]
            grid_report[method] = {"weights": list(grid), "scores": scores, "chosen": best,
                                   "criterion": "val_acc_corrected", "seed": seeds[0]}
            chosen_weight[method] = best
            method_runs[method] = [first_runs[best]] + [run(method, s, best) for s in seeds[1:]]
        else:
            method_runs[method] = [run(method, s, None) for s in seeds]

    results = _assemble(config, preset, command_line, workdir, datasets, methods, method_runs, chosen_weight, grid_report,
                        teacher_summary, teacher_records, seeds, t_start)
    if is_main:
        _write_outputs(config, workdir, results, method_runs)
    return results


def _assemble(config, preset, command_line, workdir, datasets, methods, method_runs, chosen_weight, grid_report, teacher_summary,
              teacher_records, seeds, t_start) -> dict:
    keys = ("test_acc", "seen_acc", "unseen_acc", "test_acc_corrected", "seen_acc_corrected",
            "unseen_acc_corrected", "bias_shift")
    out_methods = {}
    for method in methods:
        runs = method_runs[method]
        entry = {k: _stats([r[k] for r in runs]) for k in keys}
        for k in ("per_class_acc", "per_class_acc_corrected"):
            arr = np.asarray([r[k] for r in runs], np.float64)
            entry[k] = {"mean": arr.mean(0).tolist(), "std": arr.std(0).tolist()}
        entry["confusion"] = runs[0]["confusion"]
        entry["confusion_corrected"] = runs[0]["confusion_corrected"]
        entry["segment_weight"] = chosen_weight.get(method)
        entry["loss"] = runs[0]["config"]["loss"]["name"]
        entry["correction_split"] = runs[0]["correction_split"]
        entry["runs"] = [{"seed": r["seed"], "workdir": r["workdir"], "wall_time_s": r["wall_time_s"],
                          "epochs": r["epochs"]} for r in runs]
        out_methods[method] = entry
    name = config.data.name
    correction_split = next(iter(out_methods.values()))["correction_split"]
    return {
        "preset": preset,
        "command": command_line or "extkd reproduce",
        "dataset": {
            "name": name, "source": config.data.source, "note": DATASET_NOTES.get((name, config.data.source), ""),
            "num_classes": datasets.num_classes,
            "class_names": CLASS_NAMES.get(name, [str(i) for i in range(datasets.num_classes)]),
            "train_size": len(datasets.train), "transfer_size": len(datasets.transfer),
            "val_size": len(datasets.val), "test_size": len(datasets.test),
        },
        "drop_classes": [int(c) for c in datasets.drop_classes],
        "hardware": _hardware(),
        "teacher": {"model": config.teacher.name, "test_acc": teacher_summary["acc"],
                    "per_class_acc": teacher_summary["per_class_acc"],
                    "unseen_acc": teacher_summary.get("unseen_acc"),
                    "epochs": teacher_records[-1]["epoch"] if teacher_records else 0,
                    "wall_time_s": teacher_records[-1]["wall_time_s"] if teacher_records else float("nan"),
                    "workdir": "teacher"},
        "student_model": config.model.name,
        "seeds": seeds,
        "epochs": config.num_epochs,
        "bias_correction": {"method": config.reproduce.bias_correction,
                            "description": _describe_correction(config.reproduce.bias_correction,
                                                                correction_split)},
        "grid": grid_report,
        "methods": out_methods,
        "wall_time_s": time.time() - t_start,
    }


def _write_outputs(config, workdir: pathlib.Path, results: dict, method_runs: dict) -> None:
    from extkd_jax.experiment.plots import write_plots
    from extkd_jax.experiment.report import write_report

    configs_dir = workdir / "configs"
    configs_dir.mkdir(parents=True, exist_ok=True)
    (configs_dir / "reproduce.json").write_text(json.dumps(config_to_dict(config), indent=2))
    (configs_dir / "teacher.json").write_text(json.dumps(config_to_dict(teacher_config(config)), indent=2))
    for method, runs in method_runs.items():
        (configs_dir / f"{method}.json").write_text(json.dumps(runs[0]["config"], indent=2))
    tmp = workdir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(workdir / "results.json")
    write_plots(results, workdir)
    write_report(results, workdir)
