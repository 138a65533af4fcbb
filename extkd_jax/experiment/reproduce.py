"""`extkd reproduce`: the dark-knowledge experiment from one config, resumable run by run.

1. the teacher trains on every class (reused when `workdir/teacher` is complete);
2. selection: each distilling method trains once per value of its knob's grid (`reproduce.grid.<method>`, the same
   size for every method) with `reproduce.selection_seed`, which is never a reported seed; the value with the best
   corrected accuracy on validation images of the seen classes wins (no label of a dropped class is read);
3. every method then trains with each reported seed (`seeds`): runs of different methods sharing a seed share the
   initialisation and the data order, so methods are compared seed by seed (`comparisons`, Student t);
4. each student is scored on the test set before and after the label-free per-class bias correction;
5. optionally the dark-knowledge curve: the same students with `data.keep_fraction` of each dropped class kept;
6. `results.json`, `report.md`, PNG plots and the resolved configs are written into the workdir.

A run that stops on a non-finite loss (`on_nonfinite='stop'`) does not stop the experiment: a grid value whose
selection run diverges is not chosen (and is named in the knob-selection table); a method with no grid value left, or
whose reported runs diverge, is reported as diverged, with the run and the error, and left out of the tables and
comparisons. The run keeps a `diverged.txt` naming the error, so a rerun reports it again without training it
again; delete that file, or set `on_nonfinite='skip'`, to train it once more. A run that finishes supersedes its
`diverged.txt` (the file is removed, and a finished run is never reported as diverged, even when the removal was cut
short), so reruns of a finished experiment agree. When every method diverges the report is still written and the CLI
exits with status 3.

The outputs are written only where their content changed (`outputs.write_outputs`): a rerun of a finished
experiment writes nothing, gives the same results.json byte for byte, and works on a read-only disk.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

import jax
import ml_collections
import numpy as np
from etils import epath

from extkd_jax.data import Datasets, prepare_datasets
from extkd_jax.experiment.outputs import write_outputs
from extkd_jax.experiment.results import CurvePoint, GridPoint, MethodResult, Results, Stat, compare_all
from extkd_jax.experiment.runs import (
    METHODS,
    check_equal_budgets,
    grid_of,
    methods_of,
    run_name,
    student_config,
    teacher_config,
)
from extkd_jax.experiment.scoring import Scorer
from extkd_jax.train.config_checks import check_config
from extkd_jax.train.lock import WorkdirLock
from extkd_jax.train.loop import NonFiniteLossError, maybe_initialize_distributed, train_and_evaluate
from extkd_jax.train.metrics import read_metrics
from extkd_jax.train.setup import DTYPES, build, build_model
from extkd_jax.train.step import Network, split
from extkd_jax.train.workdir import check_or_write_config, write_text_atomic

log = logging.getLogger(__name__)


DIVERGED_MARKER = "diverged.txt"  # in a run's directory: the error that stopped it


class RunDiverged(NonFiniteLossError):
    """A run of the experiment stopped on a non-finite loss (now or, per its diverged.txt, before)."""

    def __init__(self, run: str, error: str):
        super().__init__(f"{run}: {error}")


DATASET_NOTES = {
    ("cifar10", "npz"): "CIFAR-10 copy decoded from JPEG (quality about 75, PSNR 30 dB); accuracies run 1-3 points "
    "below published CIFAR-10 figures",
}


def check_experiment(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The experiment's own checks, before anything runs; returns its methods."""
    methods = methods_of(config)
    if not methods:
        raise ValueError(f"reproduce.methods is empty; expected some of {tuple(METHODS)}")
    if config.seeds < 1:
        raise ValueError(f"seeds={config.seeds}: expected at least 1")
    if not config.data.drop_classes:
        raise ValueError("data.drop_classes is empty: the experiment needs at least one class to drop")
    check_equal_budgets(config, methods)
    if any(len(grid_of(config, m)) > 1 for m in methods) and config.data.val_size == 0:
        raise ValueError(
            "choosing on validation needs a validation split: set data.val_size > 0 or give each "
            "reproduce.grid.<method> a single value"
        )
    if selection_seed(config) in reported_seeds(config):
        raise ValueError(
            f"reproduce.selection_seed={config.reproduce.selection_seed} is a reported seed "
            f"{reported_seeds(config)}: the choice must not be made on a reported run"
        )
    for f in config.reproduce.keep_fractions:
        if not 0.0 <= f < 1.0:
            raise ValueError(f"reproduce.keep_fractions holds {f}; expected fractions in [0, 1)")
    return methods


def preflight(config: ml_collections.ConfigDict, methods: tuple[str, ...], workdir: epath.Path, datasets) -> None:
    """Every check a run of the experiment would make, made before the first run: each teacher's and each
    student's config (every grid value), and each method's student built against an untrained teacher of the
    teacher's architecture (segment indices, connectors, heads), so a bad value never surfaces hours in."""
    input_shape = tuple(datasets.transfer.images.shape[1:])
    mean, std = np.zeros(input_shape[-1], np.float32), np.ones(input_shape[-1], np.float32)
    random_teachers = {}
    for name in dict.fromkeys(METHODS[m].teacher for m in methods if METHODS[m].distils) or ("teacher",):
        c = teacher_config(config, name)
        check_config(c, "train")
        model = build_model(c.model.name, c.model.kwargs, datasets.num_classes, c.seed, DTYPES[c.compute_dtype])
        graph, variables = split(model)
        random_teachers[name] = (Network(graph, mean, std, DTYPES[c.compute_dtype]), variables)
    for method in methods:
        spec = METHODS[method]
        mode = "distill" if spec.distils else "train"
        configs = [
            student_config(config, method, config.seed, str(workdir / spec.teacher), value)
            for value in (grid_of(config, method) or (None,))
        ]
        for c in configs:
            try:
                check_config(c, mode)
            except ValueError as err:
                raise ValueError(f"method {method}: {err}") from None
        try:
            teacher = random_teachers.get(spec.teacher)
            build(configs[0], datasets.num_classes, input_shape, 1, mean, std, teacher, datasets.transfer.labels)
        except ValueError as err:
            raise ValueError(f"method {method}: {err}") from None


def reported_seeds(config) -> list[int]:
    return [config.seed + i for i in range(config.seeds)]


def selection_seed(config) -> int:
    """-1 means the seed after the reported ones."""
    return config.reproduce.selection_seed if config.reproduce.selection_seed >= 0 else config.seed + config.seeds


def _choose(grid: list[GridPoint], default: float) -> tuple[float, list[float]]:
    """(chosen value, values tied with it); a tie goes to the value nearest the configured one."""
    best = max(p.run.val_seen_acc_corrected for p in grid)
    tied = [p.value for p in grid if p.run.val_seen_acc_corrected == best]
    chosen = min(tied, key=lambda v: (abs(v - default), v))
    return chosen, (tied if len(tied) > 1 else [])


def reproduce(
    config: ml_collections.ConfigDict, workdir: str | epath.PathLike, preset: str = "", command_line: str = ""
) -> Results:
    """Runs (or resumes) the whole experiment; returns the results also written to results.json."""
    t_start = time.time()
    maybe_initialize_distributed(config.distributed)  # before anything touches a JAX backend
    workdir = epath.Path(workdir)
    methods = check_experiment(config)
    is_main = jax.process_index() == 0
    check_or_write_config(workdir, config, kind="reproduce", write=False)  # another experiment: refused, untouched
    prepared: dict[str, Datasets] = {}  # per data config: the teacher's, the transfer students', the curve's

    def data_for(run_config) -> Datasets:
        # the augmentation does not change what is read: one read serves every augmentation
        key = json.dumps({**run_config.data.to_dict(), "augment": ""}, sort_keys=True, default=str)
        if key not in prepared:
            prepared[key] = prepare_datasets(run_config.data)
        return prepared[key]

    datasets = data_for(config)
    preflight(config, methods, workdir, datasets)
    with WorkdirLock(workdir, "reproduce", enabled=is_main) as lock:
        # a read-only workdir (the lock could not be created): a finished experiment still reports, writing nothing
        check_or_write_config(workdir, config, kind="reproduce", write=is_main and not lock.read_only)
        return _reproduce(config, workdir, preset, command_line, methods, data_for, datasets, t_start, lock.read_only)


def _finished(run_dir: epath.Path, run_config) -> bool:
    """Whether a run's metrics log holds its last epoch: it finished, whatever a diverged.txt beside it says."""
    records = read_metrics(run_dir)
    return bool(records) and records[-1].get("epoch") == run_config.num_epochs


def _remove(path: epath.Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _reproduce(config, workdir, preset, command_line, methods, data_for, datasets, t_start, read_only) -> Results:
    """The experiment's runs and outputs, with its workdir held (see `reproduce`)."""
    is_main = jax.process_index() == 0
    writes = is_main and not read_only
    scorer = Scorer(datasets, config.eval_batch_size, config.reproduce.shared_shift, config.reproduce.oracle_correction)
    teachers, teacher_summaries = {}, {}
    for teacher in dict.fromkeys(METHODS[m].teacher for m in methods if METHODS[m].distils) or ("teacher",):
        teachers[teacher] = teacher_config(config, teacher)
        train_and_evaluate(teachers[teacher], workdir / teacher, mode="train", datasets=data_for(teachers[teacher]))
        teacher_summaries[teacher] = scorer.set_teacher(workdir / teacher, teacher)

    def run(method: str, seed: int, knob_value=None, keep_fraction: float = 0.0, selection: bool = False):
        name, teacher = run_name(method, seed, knob_value, keep_fraction, selection), METHODS[method].teacher
        run_config = student_config(config, method, seed, str(workdir / teacher), knob_value, keep_fraction)
        log.info("reproduce: %s", name)
        mode = "distill" if METHODS[method].distils else "train"
        marker = workdir / name / DIVERGED_MARKER
        if marker.exists():
            if _finished(workdir / name, run_config):  # finished later (on_nonfinite='skip'): the finished state wins
                log.info("reproduce: %s finished after %s was written: the file is removed", name, DIVERGED_MARKER)
                if writes:
                    _remove(marker)
            elif config.on_nonfinite == "stop":
                raise RunDiverged(name, marker.read_text())
        try:
            train_and_evaluate(run_config, workdir / name, mode=mode, datasets=data_for(run_config))
        except NonFiniteLossError as err:
            if writes:
                write_text_atomic(marker, str(err))
            raise RunDiverged(name, str(err)) from err
        if writes and marker.exists():  # the run finished: it supersedes its record of an earlier divergence
            _remove(marker)
        return scorer.score(workdir / name, method, seed, name, knob_value, keep_fraction, teacher), run_config

    results_by_method, run_configs, diverged = {}, {}, {}
    for method in methods:
        spec, grid = METHODS[method], grid_of(config, method)
        points, diverged_grid = [], {}
        for v in grid if len(grid) > 1 else ():  # a value whose selection run diverges is not chosen
            try:
                points.append(GridPoint(v, run(method, selection_seed(config), v, selection=True)[0]))
            except RunDiverged as err:
                log.warning("reproduce: %s at %s=%g diverged, not chosen: %s", method, spec.knob, v, err)
                diverged_grid[f"{v:g}"] = str(err)
        try:
            if diverged_grid and not points:
                raise RunDiverged("every grid value", "; ".join(diverged_grid.values()))
            chosen, tie = _choose(points, float(config.loss[spec.knob])) if points else (grid[0] if grid else None, [])
            finals = [run(method, s, chosen) for s in reported_seeds(config)]
        except RunDiverged as err:
            log.warning("reproduce: %s diverged, left out of the results: %s", method, err)
            diverged[method] = str(err)
            continue
        run_configs[method] = finals[0][1]
        results_by_method[method] = MethodResult(
            method, spec.loss, spec.description, spec.knob, chosen, tie, points, [r for r, _ in finals], diverged_grid
        )
    curve = _curve(config, results_by_method, run, diverged)
    results = Results(
        preset=preset,
        command=command_line or "extkd reproduce",
        dataset=_dataset_info(config, datasets),
        drop_classes=[int(c) for c in datasets.drop_classes],
        hardware=_hardware(),
        teacher=_teacher_info(config, teacher_summaries, workdir),
        student_model=config.model.name,
        seeds=reported_seeds(config),
        selection_seed=selection_seed(config),
        epochs=config.num_epochs,
        correction=_describe_correction(config, scorer.correction_split()),
        methods=results_by_method,
        comparisons=compare_all(results_by_method, [int(c) for c in datasets.drop_classes]),
        curve=curve,
        wall_time_s=time.time() - t_start,
        diverged=diverged,
    )
    if is_main:
        write_outputs(workdir, results, {"reproduce": config, **teachers, **run_configs}, read_only)
    return results


def _curve(config, methods: dict[str, MethodResult], run, diverged: dict[str, str]) -> list[CurvePoint]:
    """Accuracy on the dropped classes against the fraction of their examples kept (0 = the main runs); a point whose
    runs diverged is left out and added to `diverged`."""
    points = []
    for method in config.reproduce.curve_methods if config.reproduce.keep_fractions else ():
        if method not in methods:
            continue
        for fraction in sorted(set(config.reproduce.keep_fractions) | {0.0}):
            try:
                runs = (
                    methods[method].runs
                    if fraction == 0.0
                    else [run(method, s, methods[method].chosen, fraction)[0] for s in reported_seeds(config)]
                )
            except RunDiverged as err:
                log.warning(
                    "reproduce: %s with keep_fraction=%g diverged, left out of the curve: %s", method, fraction, err
                )
                diverged[f"{method} (keep_fraction={fraction:g})"] = str(err)
                continue
            own_runs_s = sum(r.wall_time_s for r in runs) if fraction > 0.0 else 0.0  # 0: the main runs
            points.append(
                CurvePoint(
                    method,
                    fraction,
                    Stat.of([r.unseen_acc for r in runs]),
                    Stat.of([r.unseen_acc_corrected for r in runs]),
                    own_runs_s,
                )
            )
    return points


def _dataset_info(config, datasets: Datasets) -> dict:
    return {
        "name": config.data.name,
        "source": config.data.source,
        "note": DATASET_NOTES.get((config.data.name, config.data.source), ""),
        "num_classes": datasets.num_classes,
        "class_names": datasets.class_names,
        "train_size": datasets.train_size,
        "transfer_size": datasets.transfer_size,
        "val_size": len(datasets.val),
        "test_size": len(datasets.test),
    }


def _teacher_info(config, summaries: dict[str, dict], workdir: epath.Path) -> dict:
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


def _describe_correction(config, split: str) -> str:
    where = "the validation images" if split == "val" else "the test images (no validation split)"
    how = (
        "one shift shared by all dropped classes, chosen so the student predicts them together"
        if config.reproduce.shared_shift
        else "one shift per dropped class, each chosen so the student predicts that class"
    )
    return f"{how} as often as the teacher does on {where}, without their labels"


def _hardware() -> dict:
    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
    }
