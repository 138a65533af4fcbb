"""`extkd reproduce`: the dark-knowledge experiment from one config, resumable run by run.

1. the teacher trains on every class (reused when `workdir/teacher` is complete);
   (`reproduce.teacher_seeds` >= 2: that many teachers, each with its own seed and its own students);
2. selection: each distilling method trains once per value of its knob's grid (`reproduce.grid.<method>`, the same
   size for every method) with `reproduce.selection_seed`, which is never a reported seed, from the first teacher;
   KD's grid runs first, and the methods that do not tune the temperature run at KD's choice (`runs.py`). The
   criterion is blind to the dropped classes by construction (`selection.py`): corrected accuracy on labelled
   seen-class validation images, the shift fitted on a disjoint unlabelled pool;
3. every method then trains with each reported seed (`seeds`) for each teacher: runs of different methods sharing a
   seed share the initialisation and the data order, so methods are compared per (teacher, seed) (`comparisons`,
   Student t); one comparison, `reproduce.primary`, is declared in the config before any run, the others are
   exploratory and adjusted for multiplicity (`stats.py`);
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
import time

import jax
import ml_collections
import numpy as np
from etils import epath

from extkd_jax.data import Datasets, prepare_datasets
from extkd_jax.experiment import describe
from extkd_jax.experiment.outputs import write_outputs
from extkd_jax.experiment.results import (
    CurvePoint,
    GridPoint,
    MethodResult,
    Results,
    Stat,
    compare_all,
    primary_per_teacher,
)
from extkd_jax.experiment.runs import (
    METHODS,
    check_equal_budgets,
    check_explicit_knobs,
    experiment_student_config,
    grid_of,
    indexed_teacher_config,
    methods_of,
    run_name,
    student_config,
    teacher_config,
    teacher_run,
    uses_kd_temperature,
)
from extkd_jax.experiment.scoring import Scorer
from extkd_jax.experiment.selection import SELECTION_KEYS, SelectionPlan, kd_temperature
from extkd_jax.experiment.selection import choose as _choose
from extkd_jax.methods.registry import with_method_knobs
from extkd_jax.models.registry import import_modules
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


def check_experiment(config: ml_collections.ConfigDict, command_line: str = "") -> tuple[str, ...]:
    """The experiment's own checks, before anything runs; returns its methods. `command_line`: the flags it was
    started with (a tuned knob set there is refused while a grid would override it)."""
    import_modules(config.get("imports", ()), "imports")  # plug-ins register their methods (and models) first
    with_method_knobs(config.loss)
    methods = methods_of(config)
    if not methods:
        raise ValueError(f"reproduce.methods is empty; expected some of {tuple(METHODS)}")
    if config.seeds < 1:
        raise ValueError(f"seeds={config.seeds}: expected at least 1")
    if not config.data.drop_classes:
        raise ValueError("data.drop_classes is empty: the experiment needs at least one class to drop")
    check_equal_budgets(config, methods)
    check_explicit_knobs(config, methods, command_line)
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
    primary = tuple(config.reproduce.primary)
    if primary and (len(primary) != 2 or any(m not in METHODS for m in primary) or primary[0] == primary[1]):
        raise ValueError(
            f"reproduce.primary={primary}: expected () or (method, baseline), two different names of {tuple(METHODS)}"
        )
    if isinstance(config.reproduce.teacher_seeds, bool) or int(config.reproduce.teacher_seeds) < 1:
        raise ValueError(f"reproduce.teacher_seeds={config.reproduce.teacher_seeds!r}: expected at least 1 teacher")
    fraction = config.reproduce.selection_labelled_fraction
    if not 0.0 < fraction < 1.0:
        raise ValueError(
            f"reproduce.selection_labelled_fraction={fraction}: expected a fraction in (0, 1) of the validation "
            "images, the rest being the unlabelled pool"
        )
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


def selection_plan(config, datasets: Datasets) -> SelectionPlan:
    """The labelled seen-class set and the unlabelled pool of the experiment's validation carve-out."""
    return SelectionPlan.of(
        datasets.val.labels,
        datasets.num_classes,
        datasets.drop_classes,
        config.reproduce.selection_labelled_fraction,
        config.data.seed,
    )


def reproduce(
    config: ml_collections.ConfigDict, workdir: str | epath.PathLike, preset: str = "", command_line: str = ""
) -> Results:
    """Runs (or resumes) the whole experiment; returns the results also written to results.json."""
    t_start = time.time()
    maybe_initialize_distributed(config.distributed)  # before anything touches a JAX backend
    workdir = epath.Path(workdir)
    methods = check_experiment(config, command_line)
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
    plan = selection_plan(config, datasets) if len(datasets.val) else None
    scorer = Scorer(
        datasets, config.eval_batch_size, config.reproduce.shared_shift, config.reproduce.oracle_correction, plan
    )
    n_teachers = int(config.reproduce.teacher_seeds)
    teachers, teacher_summaries = {}, {}
    for k in range(n_teachers):
        for base in dict.fromkeys(METHODS[m].teacher for m in methods if METHODS[m].distils) or ("teacher",):
            name = teacher_run(base, k)
            teachers[name] = indexed_teacher_config(config, base, k)
            train_and_evaluate(teachers[name], workdir / name, mode="train", datasets=data_for(teachers[name]))
            teacher_summaries[name] = scorer.set_teacher(workdir / name, name)

    def run(method, seed, knob_value=None, keep_fraction=0.0, selection=False, temperature=None, teacher_index=0):
        spec = METHODS[method]
        teacher = teacher_run(spec.teacher, teacher_index if spec.distils else 0)
        name = run_name(method, seed, knob_value, keep_fraction, selection, temperature, teacher_index)
        run_config = experiment_student_config(
            config, method, seed, str(workdir / teacher), knob_value, keep_fraction, temperature
        )
        log.info("reproduce: %s", name)
        mode = "distill" if spec.distils else "train"
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
        result = scorer.score(workdir / name, method, seed, name, knob_value, keep_fraction, teacher)
        result.teacher_index = teacher_index if spec.distils else 0
        return result, run_config

    selected: dict[str, tuple[list[GridPoint], dict[str, str]]] = {}

    def select(method: str, temperature: float | None) -> tuple[list[GridPoint], dict[str, str]]:
        """The selection runs of `method`'s grid (once per experiment): a value whose run diverges is not chosen."""
        if method not in selected:
            grid, points, diverged_grid = grid_of(config, method), [], {}
            for v in grid if len(grid) > 1 else ():
                try:
                    points.append(GridPoint(v, run(method, selection_seed(config), v, 0.0, True, temperature)[0]))
                except RunDiverged as err:
                    log.warning("reproduce: %s at %s=%g diverged, not chosen: %s", method, METHODS[method].knob, v, err)
                    diverged_grid[f"{v:g}"] = str(err)
            selected[method] = points, diverged_grid
        return selected[method]

    temperature = kd_temperature(config, methods, select)
    shared_t = temperature["value"] if temperature and temperature["value"] != config.loss.temperature else None
    results_by_method, run_configs, diverged = {}, {}, {}
    for method in methods:
        spec, grid = METHODS[method], grid_of(config, method)
        t = shared_t if uses_kd_temperature(method) else None
        points, diverged_grid = select(method, t)
        try:
            if diverged_grid and not points:
                raise RunDiverged("every grid value", "; ".join(diverged_grid.values()))
            chosen, tie = _choose(points, spec.knob_value(config.loss)) if points else (grid[0] if grid else None, [])
            finals = [
                run(method, s, chosen, 0.0, False, t, k)
                for k in (range(n_teachers) if spec.distils else (0,))
                for s in reported_seeds(config)
            ]
        except RunDiverged as err:
            log.warning("reproduce: %s diverged, left out of the results: %s", method, err)
            diverged[method] = str(err)
            continue
        run_configs[method] = finals[0][1]
        results_by_method[method] = MethodResult(
            method,
            spec.loss_name,
            spec.description,
            spec.knob,
            chosen,
            tie,
            points,
            [r for r, _ in finals],
            diverged_grid,
        )
    curve = _curve(config, results_by_method, run, diverged, shared_t)
    drop = [int(c) for c in datasets.drop_classes]
    primary = list(config.reproduce.primary)
    results = Results(
        preset=preset,
        command=command_line or "extkd reproduce",
        dataset=describe.dataset_info(config, datasets),
        drop_classes=drop,
        hardware=describe.hardware(),
        teacher=describe.teacher_info(config, teacher_summaries, workdir),
        student_model=config.model.name,
        seeds=reported_seeds(config),
        selection_seed=selection_seed(config),
        epochs=config.num_epochs,
        correction=describe.describe_correction(config, scorer.correction_split()),
        methods=results_by_method,
        comparisons=compare_all(results_by_method, drop, primary),
        curve=curve,
        wall_time_s=time.time() - t_start,
        diverged=diverged,
        selection=plan.summary() if plan is not None else dict.fromkeys(SELECTION_KEYS, 0),
        primary=primary,
        primary_by_teacher=primary_per_teacher(results_by_method, drop, primary, n_teachers),
        teachers=n_teachers,
        temperature=temperature,
    )
    if is_main:
        write_outputs(workdir, results, {"reproduce": config, **teachers, **run_configs}, read_only)
    return results


def _curve(
    config, methods: dict[str, MethodResult], run, diverged: dict[str, str], temperature: float | None = None
) -> list[CurvePoint]:
    """Accuracy on the dropped classes against the fraction of their examples kept (0 = the main runs), with the
    first teacher; a point whose runs diverged is left out and added to `diverged`."""
    points = []
    for method in config.reproduce.curve_methods if config.reproduce.keep_fractions else ():
        if method not in methods:
            continue
        for fraction in sorted(set(config.reproduce.keep_fractions) | {0.0}):
            try:
                t = temperature if uses_kd_temperature(method) else None
                runs = (
                    [r for r in methods[method].runs if getattr(r, "teacher_index", 0) == 0]
                    if fraction == 0.0
                    else [run(method, s, methods[method].chosen, fraction, False, t)[0] for s in reported_seeds(config)]
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
