"""A tiny end-to-end run for tests (well under a minute on a laptop CPU).

extkd reproduce --config=configs/smoke.py --workdir=/tmp/extkd_smoke

Variants: `all` (every related method), `zoo` (the KD zoo an MLP can run), `conv` (ResNets: at, nst, ft, reviewkd, ofd,
kdsvd).
"""

import ml_collections

from extkd_jax.configs import base, digits_omit3


def get_config(arg=None):
    c = digits_omit3.get_config()
    c.teacher.kwargs.hidden_sizes = (32, 32)
    c.teacher.num_epochs = 3
    c.model.kwargs.hidden_sizes = (16, 16)
    c.num_epochs = 2
    c.batch_size = 100
    c.seeds = 2
    c.progress = False
    return base.with_variant(
        c,
        arg,
        {
            "all": lambda c: base.with_all_methods(c, spatial=False),
            "zoo": lambda c: base.with_zoo(c, spatial=False),
            "conv": conv,
        },
    )


def conv(c):
    """Tiny CIFAR-style ResNets on the 8x8 digits, for the methods that need feature maps (at, nst, ft, reviewkd,
    ofd, kdsvd)
    next to kd, each at its configured knob (grids of one value: equal budgets)."""
    c.teacher.name = "resnet8"
    c.teacher.kwargs = ml_collections.ConfigDict({"in_channels": 1})  # grey digits
    c.model.name = "resnet8"
    c.model.kwargs = ml_collections.ConfigDict({"in_channels": 1})
    c.teacher.num_epochs = 2
    c.num_epochs = 1
    c.seeds = 1
    c.loss.ft.init_epochs = 0.5  # half the epoch for the paraphraser
    c.reproduce.methods = ("kd", "at", "nst", "ft", "reviewkd", "ofd", "kdsvd")
    for method in c.reproduce.methods:
        c.reproduce.grid[method] = ()
