"""The training engine (loop, step, checkpoints, loader). The package is also a function:
`extkd_jax.train(config, workdir)` trains or distils one model (`extkd_jax.api.train`).

A module-level function named `train` in `extkd_jax/__init__.py` would be replaced by this subpackage the first
time anything imports `extkd_jax.train.<module>`; making the package itself callable keeps both working.
"""

from __future__ import annotations

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, config, workdir, **overrides):
        """extkd_jax.api.train: trains (loss.name 'ce'/'purf') or distils one model into `workdir`."""
        from extkd_jax.api import train

        return train(config, workdir, **overrides)


sys.modules[__name__].__class__ = _CallablePackage
