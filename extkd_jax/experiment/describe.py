"""What results.json says about an experiment besides its runs: the data, the teachers, the correction, the
machine."""

from __future__ import annotations

import os
import socket

import jax
from etils import epath

from extkd_jax.data import Datasets, npz
from extkd_jax.train.metrics import read_metrics


def dataset_info(config, datasets: Datasets) -> dict:
    """The data of an experiment; its note is what the npz folder's README says of itself (e.g. lossy pixels)."""
    note = npz.folder_note(config.data.name, config.data.dir or None) if config.data.source == "npz" else ""
    return {
        "name": config.data.name,
        "source": config.data.source,
        "note": note,
        "num_classes": datasets.num_classes,
        "class_names": datasets.class_names,
        "train_size": datasets.train_size,
        "transfer_size": datasets.transfer_size,
        "val_size": len(datasets.val),
        "test_size": len(datasets.test),
    }


def teacher_info(config, summaries: dict[str, dict], workdir: epath.Path) -> dict:
    """The main teacher (the first trained), and the others under "others" (e.g. the PURF teacher)."""
    info = {}
    for run, summary in summaries.items():
        records = read_metrics(workdir / run)
        info[run] = {
            "model": config.teacher.name,
            "test_acc": summary["acc"],
            "per_class_acc": summary["per_class_acc"],
            "unseen_acc": summary.get("unseen_acc"),
            "epochs": records[-1]["epoch"] if records else 0,
            "wall_time_s": records[-1]["wall_time_s"] if records else float("nan"),
            "workdir": run,
        }
    main, *others = info
    return {**info[main], "others": {run: info[run] for run in others}}


def describe_correction(config, split: str) -> str:
    where = "the validation images" if split == "val" else "the test images (no validation split)"
    how = (
        "one shift shared by all dropped classes, chosen so the student predicts them together"
        if config.reproduce.shared_shift
        else "one shift per dropped class, each chosen so the student predicts that class"
    )
    return f"{how} as often as the teacher does on {where}, without their labels"


def hardware() -> dict:
    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
    }
