"""A tiny end-to-end run for tests (well under a minute on a laptop CPU).

extkd reproduce --config=configs/smoke.py --workdir=/tmp/extkd_smoke
"""

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
        {"all": lambda c: base.with_all_methods(c, spatial=False), "zoo": lambda c: base.with_zoo(c, spatial=False)},
    )
