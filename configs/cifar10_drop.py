"""The paper's experiment (Yuan & Pan 2019) on CIFAR-10: teacher resnet56 on every class; students resnet20
on a transfer set without `data.drop_classes` (cat by default; any tuple works), T=4, KD = 0.1 CE + 0.9 KL.

Accelerator scale (one GPU or TPU host; bf16 compute, batch 512, cosine schedule with warm-up):

    extkd reproduce --config=cifar10_drop --workdir=/tmp/cifar10_drop

Variants (`--config=cifar10_drop:<variant>`):
- `cpu`: 2 CPU cores in about an hour: a fixed 20,000-image subset of the training set (2,000 of it for
  validation), teacher resnet14 for 8 epochs, students resnet8 for 5 epochs, batch 128, two seeds, float32,
  methods scratch_full, scratch_transfer, kd and extended_kd;
- `two`: cat and dog both dropped (the paper's "some labels");
- `conv` (after `cpu`): the methods that use the networks' feature maps (at, mtkd_ssr, ssd_kd, amkd, pfkd) with
  kd and extended_kd, each on a two-value grid, for the CIFAR-10 method comparison (not run on CPU yet: about
  50 student runs of 5 minutes each);
- `zoo` (after `cpu`): the standard KD zoo (`base.ZOO_METHODS`) next to kd and extended_kd;
- `short`: the accelerator device check (benchmarks/device_check.sh): the full-size models, teacher 12 epochs,
  students 8, one seed, kd and extended_kd at segment weight 1;
- `mini`: the CPU rehearsal of benchmarks/paper_scale.py (MLPs on a small synthetic CIFAR-shaped set, seconds per
  run): the preset's methods, grids and statistics at toy sizes;
- `teacher` (alone or after a size, `cpu,teacher`): the teacher run alone, for `extkd train`.

Data: an npz folder (`--config.data.dir=DIR`, else `$EXTKD_DATA_DIR/cifar10`; `extkd data prepare cifar10
--out=DIR [--from=cifar-10-python.tar.gz]` makes one), else tfds `cifar10`. The README's CPU-scale tables were
measured on a copy decoded from JPEG: expect 1-3 points under published accuracies there.
"""

import ml_collections

from extkd_jax.configs import base


def get_config(arg=None):
    c = base.get_config()
    c.kind = "experiment"
    c.data.source = "npz"
    c.data.name = "cifar10"
    c.data.dir = ""  # the dataset, not a folder: $EXTKD_DATA_DIR/cifar10, else tfds (configs/base.py)
    c.data.val_size = 5000
    c.data.drop_classes = (3,)
    c.data.augment = "cifar"

    c.teacher.name = "resnet56"
    c.teacher.num_epochs = 40
    c.model.name = "resnet20"

    c.loss.temperature = 4.0
    c.loss.ce_weight = 0.1
    c.loss.kd_weight = 0.9
    c.optim.learning_rate = 0.2
    c.optim.momentum = 0.9
    c.optim.nesterov = True
    c.optim.weight_decay = 5e-4
    c.optim.schedule = "cosine"
    c.optim.warmup_epochs = 2
    c.batch_size = 512
    c.eval_batch_size = 1000
    c.num_epochs = 30
    c.compute_dtype = "bfloat16"
    c.seeds = 3
    c.reproduce.grid.kd = (2.0, 4.0, 8.0)
    c.reproduce.grid.fitnet = (0.1, 1.0, 10.0)
    c.reproduce.grid.extended_kd = (0.1, 1.0, 10.0)
    return base.with_variant(c, arg, {"cpu": cpu, "short": short, "two": two, "conv": conv, "zoo": zoo, "mini": mini})


def cpu(c):
    """2 CPU cores: a 20k-image subset, resnet14 -> resnet8, 5 student epochs, one seed."""
    c.data.max_train_examples = 20000
    c.data.val_size = 2000
    c.teacher.name = "resnet14"
    c.teacher.num_epochs = 8
    c.model.name = "resnet8"
    c.optim.learning_rate = 0.1
    c.optim.warmup_epochs = 1
    c.batch_size = 128
    c.num_epochs = 5
    c.compute_dtype = "float32"
    c.seeds = 2
    c.reproduce.methods = ("scratch_full", "scratch_transfer", "kd", "extended_kd")
    c.reproduce.grid.kd = (2.0, 4.0)
    c.reproduce.grid.extended_kd = (0.3, 1.0)


def short(c):
    """The device check: full-size models, fewer epochs, one seed, teacher + kd + extended_kd."""
    c.teacher.num_epochs = 12
    c.num_epochs = 8
    c.seeds = 1
    c.reproduce.methods = ("kd", "extended_kd")
    c.reproduce.grid.kd = ()
    c.reproduce.grid.extended_kd = ()


def mini(c):
    """The CPU rehearsal of benchmarks/paper_scale.py: MLPs, 4 epochs, two-value grids."""
    c.data.val_size = 200
    c.teacher.name = "mlp"
    c.teacher.kwargs = ml_collections.ConfigDict({"hidden_sizes": (32,), "input_size": 3072})
    c.model.name = "mlp"
    c.model.kwargs = ml_collections.ConfigDict({"hidden_sizes": (16,), "input_size": 3072})
    c.teacher.num_epochs = 4
    c.num_epochs = 4
    c.batch_size = 100
    c.eval_batch_size = 500
    c.optim.learning_rate = 0.1
    c.optim.warmup_epochs = 0
    c.compute_dtype = "float32"
    c.seeds = 2
    c.progress = False
    c.reproduce.grid.kd = (2.0, 4.0)
    c.reproduce.grid.fitnet = (0.1, 1.0)
    c.reproduce.grid.extended_kd = (0.3, 1.0)


def two(c):
    """Cat and dog dropped together."""
    c.data.drop_classes = (3, 5)


def zoo(c):
    """The standard KD zoo next to kd and extended_kd, two-value grids."""
    base.with_zoo(c, spatial=True)


def conv(c):
    """The feature-map methods of docs/methods.md next to kd and extended_kd."""
    base.with_all_methods(c, spatial=True)
    c.reproduce.methods = ("scratch_transfer", "kd", "extended_kd", "at", "mtkd_ssr", "ssd_kd", "amkd", "pfkd")
