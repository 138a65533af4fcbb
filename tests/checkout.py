"""The presets of a checkout used without installing it (tests/conftest.py calls `map_checkout_configs`).

The presets live in <repo>/configs; setup.cfg's package_dir makes them `extkd_jax.configs` in the wheel and in the
editable install (`pip install -e .`), and nothing in the package edits its own `__path__` to find them. A copy of
the checkout run with only the dependencies installed (benchmarks/device_check.sh: the wheelhouse's packages, then
pytest puts the checkout first on sys.path) has no `extkd_jax.configs`; this maps it there, for the test process
only, as the editable install does. Subprocesses that tests start with PYTHONPATH=<repo> need an installed checkout.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MAPPED: list[bool] = []  # [True] once map_checkout_configs had to map the presets (no install provides them)


def map_checkout_configs() -> bool:
    """Makes <repo>/configs importable as `extkd_jax.configs` when no install provides it; True when it had to."""
    if importlib.util.find_spec("extkd_jax.configs") is not None:
        return False
    configs = REPO_ROOT / "configs"
    spec = importlib.util.spec_from_file_location(
        "extkd_jax.configs", configs / "__init__.py", submodule_search_locations=[str(configs)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["extkd_jax.configs"] = module
    spec.loader.exec_module(module)
    import extkd_jax

    extkd_jax.configs = module  # as an import of the subpackage would bind it
    MAPPED.append(True)
    return True
