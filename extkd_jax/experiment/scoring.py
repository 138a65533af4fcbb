"""Scoring a trained student of the experiment: test accuracy before and after the label-free correction, and the
selection criterion (`selection.criterion`), blind to the dropped classes by construction."""

from __future__ import annotations

import numpy as np
from etils import epath

from extkd_jax.data import Datasets
from extkd_jax.experiment import bias_correction as bc
from extkd_jax.experiment.results import RunResult
from extkd_jax.experiment.selection import SelectionPlan, criterion_of_plan
from extkd_jax.train import sharding
from extkd_jax.train.evaluate import Predictor, restore_model
from extkd_jax.train.metrics import classification_summary, confusion_matrix, read_metrics


class Scorer:
    """Logits of trained workdirs on the experiment's validation and test images (placed once on the mesh)."""

    def __init__(
        self,
        datasets: Datasets,
        eval_batch_size: int,
        shared_shift: bool,
        oracle: bool,
        selection: SelectionPlan | None = None,
    ):
        self.datasets, self.eval_batch_size, self.selection = datasets, eval_batch_size, selection
        self.shared_shift, self.oracle = shared_shift, oracle
        self.mesh = sharding.make_mesh()
        self._placed: dict[int, dict] = {}  # per eval batch size: the placed val and test images
        self.teacher_logits: dict[str, dict[str, np.ndarray]] = {}  # per teacher run: val and test logits

    def logits(self, workdir: epath.Path) -> dict[str, np.ndarray]:
        network, variables, _ = restore_model(workdir)
        predictor = Predictor(network, self.mesh, self.eval_batch_size)
        placed = self._placed.setdefault(
            predictor.batch_size, {s: predictor.place(getattr(self.datasets, s).images) for s in ("val", "test")}
        )
        variables = sharding.put_replicated(variables, self.mesh)
        return {s: predictor.logits(variables, placed[s]) for s in ("val", "test")}

    def set_teacher(self, workdir: epath.Path, name: str = "teacher") -> dict:
        """Reads a teacher's logits (its predicted class frequencies are its students' correction target)."""
        self.teacher_logits[name] = self.logits(workdir)
        ds = self.datasets
        return classification_summary(
            self.teacher_logits[name]["test"], ds.test.labels, ds.num_classes, ds.drop_classes
        )

    def correction_split(self) -> str:
        """Unlabelled images for the correction: validation when there is one, else (a weaker protocol) test."""
        return "val" if len(self.datasets.val) else "test"

    def score(
        self,
        workdir: epath.Path,
        method: str,
        seed: int,
        name: str,
        knob_value,
        keep_fraction,
        teacher: str = "teacher",
    ) -> RunResult:
        ds, classes = self.datasets, list(self.datasets.drop_classes)
        logits = self.logits(workdir)
        split = self.correction_split()
        target = self.teacher_logits[teacher][split]  # the student's own teacher
        shifts = bc.shifts_to_match_teacher(logits[split], target, classes, self.shared_shift)
        test, labels = logits["test"], ds.test.labels
        corrected = bc.shift_logits(test, classes, shifts)
        before = classification_summary(test, labels, ds.num_classes, classes)
        after = classification_summary(corrected, labels, ds.num_classes, classes)
        records = read_metrics(workdir)
        return RunResult(
            method=method,
            seed=seed,
            workdir=name,
            knob_value=knob_value,
            keep_fraction=keep_fraction,
            test_acc=before["acc"],
            seen_acc=before["seen_acc"],
            unseen_acc=before["unseen_acc"],
            test_acc_corrected=after["acc"],
            seen_acc_corrected=after["seen_acc"],
            unseen_acc_corrected=after["unseen_acc"],
            bias_shift=shifts,
            val_seen_acc_corrected=self.criterion(logits["val"], teacher),
            per_class_acc=before["per_class_acc"],
            per_class_acc_corrected=after["per_class_acc"],
            confusion_corrected=confusion_matrix(corrected, labels, ds.num_classes).tolist(),
            wall_time_s=records[-1]["wall_time_s"] if records else float("nan"),
            epochs=records[-1]["epoch"] if records else 0,
            oracle=self._oracle(logits, classes) if self.oracle else None,
        )

    def criterion(self, val_logits: np.ndarray, teacher: str = "teacher") -> float:
        """The selection criterion of a student's validation logits (NaN without a validation split): the shift
        fitted on the selection's unlabelled pool, the accuracy read on its labelled seen-class set."""
        if self.selection is None:
            return float("nan")
        return criterion_of_plan(self.selection, val_logits, self.teacher_logits[teacher]["val"], self.shared_shift)

    def _oracle(self, logits: dict, classes: list[int]) -> dict:
        """The shared shift that maximises validation accuracy with the dropped classes' labels: an upper bound."""
        ds = self.datasets
        shift = bc.shift_maximizing_accuracy(logits["val"], ds.val.labels, classes)
        after = classification_summary(
            bc.shift_logits(logits["test"], classes, shift), ds.test.labels, ds.num_classes, classes
        )
        return {"shift": shift, "test_acc": after["acc"], "unseen_acc": after["unseen_acc"]}
