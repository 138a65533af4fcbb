"""The method layer: what each distillation method is (`Method`, one object per method in its own or its family's
file), the registry (`register_method`, `get_method`, `method_names`), and the roles of `extkd reproduce`; below the
engine that runs them (extkd_jax/train) and the experiments that compare them (extkd_jax/experiment)."""

from extkd_jax.methods.base import Build, Method
from extkd_jax.methods.context import Context, pooled
from extkd_jax.methods.registry import get_method, loss_names, method_names, register_method, role_names

__all__ = [
    "Build",
    "Context",
    "Method",
    "get_method",
    "loss_names",
    "method_names",
    "pooled",
    "register_method",
    "role_names",
]
