"""The whole recipe in one place: every key a run reads, with its default.

Presets import this and change what differs. Run any of them by name (or by path) with
        extkd train --config=<preset>[:variant] --workdir=/tmp/run --config.key=value

Experiment presets (`kind="experiment"`, run by `extkd reproduce`) take variants in ml_collections' style,
`--config=cifar10_drop:cpu`, parsed by `with_variant`: a size the preset defines (e.g. `cpu`), a role
(`teacher`: the teacher alone, for `extkd train`; a student method such as `kd` or `extended_kd`, for
`extkd distill`), or both, comma-separated (`cifar10_drop:cpu,teacher`).
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from extkd_jax.methods import get_method, method_names, role_names
from extkd_jax.methods.registry import builtin_names

# extkd_jax.methods.roles.METHODS that distil (each tunes one knob on validation), the KD zoo apart
DISTILLING_METHODS = tuple(m for m in role_names() if get_method(m).distils and not get_method(m).zoo)
# the standard KD baselines of RepDistiller / mdistiller (issue #15), compared by `with_zoo`
ZOO_METHODS = tuple(m for m in role_names() if get_method(m).zoo)
# need feature maps (H, W, C), left out for MLP students (ofd: the ResNets' pre-activation taps)
SPATIAL_METHODS = tuple(m for m in role_names() if "feature_maps" in get_method(m).needs)
# the two-value grid of each method's knob in the comparison of every method (with_all_methods, with_zoo), by
# method (each Method's `grid`); the temperature's is the preset's kd grid, the init stage's INIT_STAGE_FRACTIONS
TWO_VALUE_GRIDS = {m: get_method(m).grid for m in role_names() if isinstance(get_method(m).grid, tuple)}
# ab, fsp, ft: their init stage as a tenth and a quarter of the student's epochs (RepDistiller's is 30 of 270)
INIT_STAGE_FRACTIONS = (0.1, 0.25)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.kind = "run"  # run: one model (`extkd train` / `distill`) | experiment: `extkd reproduce`
    c.seed = 0
    # modules (dotted import paths, e.g. ("my_models",)) imported before the config is checked or anything built:
    # plug-ins that call register_model. Recorded in the workdir's config and card, so that `extkd evaluate`,
    # `extkd_jax.load` and a rerun in a new process import them again (they must be importable there: PYTHONPATH)
    c.imports = ()

    c.data = ml_collections.ConfigDict()
    c.data.source = "npz"  # "npz" (offline folder), "tfds", or "sklearn" (bundled 8x8 digits)
    c.data.name = "mnist"  # cifar10 | cifar100 | mnist | fashion_mnist | digits
    # where the data is: an npz folder (DIR/<name>/ or DIR itself, local or gs://), or tfds's data_dir. Empty: an npz
    # folder $EXTKD_DATA_DIR/<name>, else tfds ($TFDS_DATA_DIR or ~/tensorflow_datasets). Not part of a workdir's
    # identity (a copy of the same data elsewhere is the same run); `extkd data prepare` makes an npz folder
    c.data.dir = ""
    c.data.download = True  # tfds: download and prepare a dataset missing under its data_dir (needs internet)
    c.data.val_size = 5000  # carved from train, deterministic for data.seed
    c.data.seed = 0
    c.data.max_train_examples = 0  # 0 = the whole training split; else a fixed random subset (small budgets)
    c.data.drop_classes = ()  # labels removed from the student's transfer set
    c.data.keep_fraction = 0.0  # fraction of each dropped class kept (0 = drop all)
    c.data.augment = "auto"  # auto | cifar | mnist | flip | none, then optionally +auto (an AutoAugment-style
    #                          policy) and +mixup or +cutmix (mixed in the step, for teacher and student alike)
    c.data.placement = "auto"  # replicated | sharded (each device holds a slice) | auto (sharded if multi-host)
    c.data.pipeline = "auto"  # device (the set on the devices) | stream (read while training, grain) | auto
    c.data.device_budget_gb = 8.0  # auto: stream when the uint8 transfer set is larger (or its images vary)
    c.data.crop_size = 0  # stream: ImageNet crops to this size (random resized / centre); 0 = images as they are
    c.data.stats_sample = 0  # stream: normalisation statistics from this many training images (0 = all)
    c.data.read_threads = 8  # stream: threads reading and decoding images per process

    c.model = ml_collections.ConfigDict()
    c.model.name = "mlp"  # student (or the model trained by `extkd train`)
    c.model.kwargs = ml_collections.ConfigDict()

    c.teacher = ml_collections.ConfigDict()
    c.teacher.name = ""
    c.teacher.kwargs = ml_collections.ConfigDict()
    c.teacher.workdir = ""  # workdir of the `extkd train` run that produced the teacher
    c.teacher.fold_batchnorm = True
    c.teacher.allow_unfinished = False  # `distill`: accept a teacher whose run has not finished (refused otherwise)
    c.teacher.num_epochs = 0  # `reproduce`: epochs of the teacher run (0 = num_epochs)
    c.teacher.learning_rate = 0.0  # `reproduce`: teacher learning rate (0 = optim.learning_rate)

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "ce"  # a registered method with an objective (extkd_jax.methods.loss_names(); docs/config.md)
    c.loss.temperature = 4.0
    c.loss.ce_weight = 1.0
    c.loss.kd_weight = 1.0
    c.loss.segments = ()  # student segment indices used (empty: all; fitnet: the middle one; ft: the last one)
    c.loss.teacher_segments = ()  # matching teacher indices (empty: same as loss.segments)
    c.loss.label_smoothing = 0.0
    c.loss.mix_alpha = 1.0  # Beta(a, a) of mixup / CutMix (data.augment '+mixup', '+cutmix')
    # each method's own knobs, `loss.<method>.<knob>` (e.g. loss.dkd.beta), with the defaults of its Method
    # (extkd_jax/methods/<its file>.py; docs/reference_recipes.md compares them with its reference code)
    for name in method_names():
        if get_method(name).knobs:
            c.loss[name] = ml_collections.ConfigDict(dict(get_method(name).knobs))

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 0.1
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.weight_decay = 5e-4
    c.optim.schedule = "cosine"  # cosine | step | constant
    c.optim.warmup_epochs = 0
    c.optim.decay_epochs = ()  # step schedule boundaries (epochs)
    c.optim.decay_factor = 0.1

    c.batch_size = 128
    c.eval_batch_size = 1000
    c.num_epochs = 10
    c.compute_dtype = "float32"  # float32 | bfloat16 (parameters stay float32)
    c.steps_per_dispatch = 0  # steps per compiled program; 0 = auto: the epoch on GPU/TPU, 1 on CPU
    c.checkpoint_every_epochs = 1
    c.keep_checkpoints = 2
    c.on_nonfinite = "stop"  # stop | skip (skip the update of a step whose loss is NaN/Inf)
    c.progress = True  # tqdm progress bar
    # where the scalars go (train/writers.py), at the global step; metrics.jsonl (epoch records) is always written
    c.metrics = ml_collections.ConfigDict()
    c.metrics.writers = ("jsonl", "tensorboard")  # jsonl (scalars.jsonl, hparams.json) | tensorboard | wandb
    c.metrics.log_every_steps = 50  # loss, its parts and the rate of every N-th step (0: the epoch records only)
    c.metrics.wandb_project = "extkd_jax"  # wandb: the W&B project, entity ("" = your default) and mode
    c.metrics.wandb_entity = ""
    c.metrics.wandb_mode = ""  # "" = wandb's default ($WANDB_MODE) | online | offline | disabled

    # `extkd reproduce`: the dark-knowledge experiment
    c.seeds = 1  # reported runs per student method: seeds seed, seed+1, ...
    c.reproduce = ml_collections.ConfigDict()
    c.reproduce.methods = ("scratch_full", "scratch_transfer", "kd", "fitnet", "extended_kd")  # see with_all_methods
    # the knob grid tried on validation per distilling method (its Method's `tune`: kd: loss.temperature; fitnet:
    # loss.fitnet.weight; dkd: loss.dkd.beta); every distilling method needs a grid of the same size
    c.reproduce.grid = ml_collections.ConfigDict()
    for method in role_names():  # at call time: a plug-in registered since this module's import has a grid too
        spec = get_method(method)
        if spec.distils:  # () = no tuning: the configured loss value; a plug-in starts from the grid it declares
            plugin = method not in builtin_names() and isinstance(spec.grid, tuple)
            c.reproduce.grid[method] = tuple(spec.grid) if plugin else ()
    c.reproduce.selection_seed = -1  # seed of the grid runs; -1 = seed + seeds (never a reported seed)
    c.reproduce.shared_shift = False  # one correction shift for all dropped classes instead of one per class
    c.reproduce.oracle_correction = False  # also report the label-using correction (an upper bound, apart)
    c.reproduce.keep_fractions = ()  # dark-knowledge curve: fractions of each dropped class kept, e.g. (0.02,)
    c.reproduce.curve_methods = ("scratch_transfer", "kd", "extended_kd")
    # the one comparison judged at its own p (declared before any run): method - baseline on the dropped classes,
    # corrected; every other comparison is exploratory (Holm-adjusted). () = none
    c.reproduce.primary = ("extended_kd", "kd")
    c.reproduce.teacher_seeds = 1  # teachers (seeds seed, seed + 1000, ...), each with its own students
    # selection: this fraction of the validation images, less the dropped classes, is the labelled set; the rest
    # is the unlabelled pool on which the correction shift is fitted (experiment/selection.py)
    c.reproduce.selection_labelled_fraction = 0.5

    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = False  # call jax.distributed.initialize (auto-detects on TPU VMs)
    c.distributed.coordinator_address = ""
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    return c


def with_variant(
    config: ml_collections.ConfigDict,
    arg: str | None,
    sizes: dict[str, Callable[[ml_collections.ConfigDict], None]] | None = None,
) -> ml_collections.ConfigDict:
    """The experiment `config` at the sizes and in the role named by `arg` ("", "cpu", "cpu,two", "cpu,teacher").

    Sizes (functions of the preset that edit the config) apply in the order given; a role then turns the
    experiment into the config of one of its runs (`extkd_jax.methods.roles`). Unknown names raise ValueError.
    """
    from extkd_jax.methods.roles import METHODS, role_config

    sizes = sizes or {}
    words = [w.strip() for w in (arg or "").split(",") if w.strip()]
    known = sorted(sizes) + ["teacher", *METHODS]
    for word in words:
        if word not in known:
            raise ValueError(
                f"unknown config variant {word!r}; expected sizes {sorted(sizes)} or roles "
                f"{['teacher', *METHODS]}, comma-separated (e.g. 'cpu,teacher')"
            )
    roles = [w for w in words if w not in sizes]
    if len(roles) > 1:
        raise ValueError(f"config variant {arg!r}: expected at most one role, got {roles}")
    for word in words:  # sizes in the order given, e.g. "cpu,two"
        if word in sizes:
            sizes[word](config)
    return role_config(config, roles[0]) if roles else config


def with_all_methods(config: ml_collections.ConfigDict, spatial: bool) -> None:
    """Every method of `extkd reproduce`, each with a two-value grid of its knob (equal budgets): the preset's
    kd temperature grid for the methods tuning the temperature. `spatial`: the networks have feature maps (attention
    transfer needs them)."""
    from extkd_jax.methods.roles import METHODS

    config.reproduce.methods = tuple(
        m for m in METHODS if m not in ZOO_METHODS and (spatial or m not in SPATIAL_METHODS)
    )
    _two_value_grids(config, DISTILLING_METHODS)


def with_zoo(config: ml_collections.ConfigDict, spatial: bool) -> None:
    """The KD zoo (ZOO_METHODS) next to the scratch students, kd and extended_kd, each distilling method on a
    two-value grid (equal budgets). `spatial`: the networks have feature maps (nst needs them)."""
    zoo = tuple(m for m in ZOO_METHODS if spatial or m not in SPATIAL_METHODS)
    config.reproduce.methods = ("scratch_full", "scratch_transfer", "kd", "extended_kd", *zoo)
    _two_value_grids(config, ("kd", "extended_kd", *zoo))


def _two_value_grids(config: ml_collections.ConfigDict, methods: tuple[str, ...]) -> None:
    """A two-value grid of each method's knob (its Method's `grid`): the preset's kd temperature grid for the
    temperature, fractions of num_epochs for an init stage."""
    temperatures = tuple(config.reproduce.grid.kd) or (config.loss.temperature / 2, config.loss.temperature)
    for method in methods:
        grid = get_method(method).grid
        if grid == "temperature":
            config.reproduce.grid[method] = temperatures
        elif grid == "init_stage":
            config.reproduce.grid[method] = tuple(f * config.num_epochs for f in INIT_STAGE_FRACTIONS)
        else:
            config.reproduce.grid[method] = tuple(grid)
