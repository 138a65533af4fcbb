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

# extkd_jax.methods.roles.METHODS that distil (each tunes one knob on validation)
DISTILLING_METHODS = (
    "kd",
    "fitnet",
    "at",
    "extended_kd",
    "dkd",
    "mkd",
    "mtkd_ssr",
    "amkd",
    "pfkd",
    "mismatch",
    "purf_kd",
    "ssd_kd",
    "kd_mixup",
    "kd_cutmix",
    "kd_auto",
)
# the standard KD baselines of RepDistiller / mdistiller (issue #15), compared by `with_zoo`
ZOO_METHODS = (
    "pkt",
    "rkd",
    "sp",
    "cc",
    "nst",
    "dist",
    "ls_kd",
    "mlkd",
    "vid",
    "ab",
    "fsp",
    "ft",
    "reviewkd",
    "ofd",
    "crd",
    "kdsvd",
)
# need feature maps (H, W, C), left out for MLP students (ofd: the ResNets' pre-activation taps)
SPATIAL_METHODS = ("at", "nst", "ft", "reviewkd", "ofd", "kdsvd")
# a two-value grid per knob for the comparison of every method (with_all_methods); the temperature's is the preset's
TWO_VALUE_GRIDS = {
    "segment_weight": (0.1, 1.0),
    "dkd_beta": (2.0, 8.0),
    "mix_alpha": (0.2, 1.0),
    "triplet_weight": (0.1, 1.0),
    "feature_temperature": (2.0, 8.0),
    "sample_weight": (0.3, 1.0),
    "relation_weight": (0.1, 1.0),
    # the zoo's weights: RepDistiller's default (its beta for CIFAR-100) and a tenth of it
    "pkt_weight": (3000.0, 30000.0),
    "rkd_weight": (0.1, 1.0),
    "sp_weight": (300.0, 3000.0),
    "cc_weight": (1.0, 10.0),
    "nst_weight": (5.0, 50.0),
    "vid_weight": (0.1, 1.0),
    "ft_weight": (20.0, 200.0),
    "review_weight": (0.1, 1.0),
    "ofd_weight": (1e-4, 1e-3),
    "contrast_weight": (0.08, 0.8),
    "kdsvd_weight": (0.1, 1.0),
}
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
    c.loss.name = "ce"  # ce | purf (alone) | kd | fitnet | extended_kd | at | dkd | mkd | mtkd_ssr | amkd | pfkd
    #                     | mismatch | ssd_kd | pkt | rkd | sp | cc | nst | dist | ls_kd | mlkd | vid | ab | fsp | ft
    #                     | reviewkd | ofd | crd | kdsvd
    #                     (with a teacher): see
    #                     extkd_jax/train/objectives.py
    c.loss.temperature = 4.0
    c.loss.ce_weight = 1.0
    c.loss.kd_weight = 1.0
    c.loss.segment_weight = 1.0  # fitnet / extended_kd MSE weight (at: the AT beta)
    c.loss.segments = ()  # student segment indices used (empty: all; fitnet: the middle one)
    c.loss.teacher_segments = ()  # matching teacher indices (empty: same as loss.segments)
    c.loss.label_smoothing = 0.0
    c.loss.at_p = 2.0
    c.loss.dkd_alpha = 1.0
    c.loss.dkd_beta = 8.0
    c.loss.dkd_warmup_epochs = 0
    # the methods of train/objectives.py (docs/methods.md): their knobs, with the defaults their papers use or the
    # simplest reading where they say nothing
    c.loss.mix_alpha = 1.0  # Beta(a, a) of mixup / CutMix (data.augment '+mixup', '+cutmix') and of mkd
    c.loss.srd_weight = 1.0  # mtkd_ssr: stage heads taught by the teacher
    c.loss.crd_weight = 1.0  # mtkd_ssr: stage heads taught by the next stage
    c.loss.adv_steps = 5  # amkd: attack steps towards the boundary; mismatch: steps towards the sampled class
    c.loss.adv_step_size = 8.0  # ... of this size, in pixels (L2 for amkd, per pixel for mismatch)
    c.loss.triplet_weight = 1.0  # amkd
    c.loss.triplet_margin = 0.2  # amkd, on L2-normalised embeddings
    c.loss.embedding_size = 64  # amkd: the projector's output
    c.loss.feature_temperature = 4.0  # pfkd
    c.loss.feature_weight = 1.0  # pfkd
    c.loss.sample_weight = 1.0  # mismatch: KL on the sampled images
    c.loss.purf_weight = 0.1  # purf (a teacher's objective): smoothness under input noise
    c.loss.purf_sigma = 8.0  # ... of this standard deviation, in pixels
    c.loss.relation_weight = 1.0  # ssd_kd: relational KD
    c.loss.ss_weight = 1.0  # ssd_kd: the rotation task
    # the zoo (issue #15): each added to KD with the weight RepDistiller uses for it (its `-b` on CIFAR-100)
    c.loss.pkt_weight = 30000.0  # pkt, on the penultimate features
    c.loss.rkd_weight = 1.0  # rkd (25 x distance + 50 x angle inside), on the penultimate features
    c.loss.sp_weight = 3000.0  # sp, on the last segment
    c.loss.cc_weight = 10.0  # cc, on the penultimate features (our kernel form: RepDistiller's 0.02 is for another)
    c.loss.cc_gamma = 0.4  # cc: the RBF kernel's gamma on unit embeddings
    c.loss.nst_weight = 50.0  # nst, on every paired segment
    c.loss.dist_beta = 1.0  # dist: inter-class relation (replaces the KL, weighted by kd_weight)
    c.loss.dist_gamma = 1.0  # dist: intra-class relation
    # mlkd: CE + kd_weight x multi-level logit KD at loss.temperature and 2, 3, 5, 6 (no weight of its own)
    c.loss.mlkd_batch_invariant = False  # mlkd: relation terms x C / N^2 (True) or the reference's 1/C, 1/N
    c.loss.vid_weight = 1.0  # vid, on every paired segment
    c.loss.vid_init_variance = 5.0  # vid: the learned variance's starting value
    c.loss.init_epochs = 1.0  # ab, fsp, ft: epochs of the feature-only init stage (RepDistiller: 30 of 270)
    c.loss.ab_weight = 1.0  # ab in the init stage (RepDistiller's sum of its layer losses)
    c.loss.ab_margin = 1.0  # ab: the margin m
    c.loss.fsp_weight = 1.0  # fsp in the init stage (RepDistiller's sum over layer pairs)
    c.loss.ft_weight = 200.0  # ft, after its init stage (the paraphraser's; init_epochs too)
    c.loss.ft_rate = 0.5  # ft: the factor's channels, as a fraction of the teacher's last segment's
    c.loss.review_weight = 1.0  # reviewkd: hierarchical context loss (mdistiller's default; its CIFAR-100 config: 5.0)
    c.loss.review_warmup_epochs = 1.0  # reviewkd: its weight ramps up linearly over these epochs
    c.loss.ofd_weight = 1e-3  # ofd: its per-example sums (mdistiller's CIFAR FEAT_WEIGHT)
    # crd: KD + contrast_weight x the NCE loss of both embeddings against the other network's memory bank (on the
    # penultimate features); RepDistiller's defaults: -b 0.8, 16384 negatives, 128-d, nce_t 0.07, momentum 0.5
    c.loss.contrast_weight = 0.8
    c.loss.contrast_negatives = 16384
    c.loss.contrast_dim = 128
    c.loss.contrast_temperature = 0.07
    c.loss.contrast_momentum = 0.5
    c.loss.kdsvd_weight = 1.0  # kdsvd, on every paired segment (mdistiller's FEAT_WEIGHT)
    c.loss.kdsvd_k = 1  # kdsvd: the teacher's singular vectors per segment (the student's: k + 3)

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
    # the knob grid tried on validation per distilling method (kd: loss.temperature; fitnet, at, extended_kd:
    # loss.segment_weight; dkd: loss.dkd_beta); every distilling method needs a grid of the same size
    c.reproduce.grid = ml_collections.ConfigDict()
    for method in DISTILLING_METHODS + ZOO_METHODS:
        c.reproduce.grid[method] = ()  # () = no tuning: the configured loss value
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
    """A two-value grid of each method's knob: the preset's kd temperature grid for the temperature."""
    from extkd_jax.methods.roles import METHODS

    temperatures = tuple(config.reproduce.grid.kd) or (config.loss.temperature / 2, config.loss.temperature)
    for method in methods:
        knob = METHODS[method].knob
        if knob == "temperature":
            config.reproduce.grid[method] = temperatures
        elif knob == "init_epochs":
            config.reproduce.grid[method] = tuple(f * config.num_epochs for f in INIT_STAGE_FRACTIONS)
        else:
            config.reproduce.grid[method] = TWO_VALUE_GRIDS[knob]
