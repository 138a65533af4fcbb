"""What an objective sees: `Context` and `pooled` live with the methods (extkd_jax/methods/context.py); re-exported
here for the engine's modules and older imports."""

from extkd_jax.methods.context import Context, pooled

__all__ = ["Context", "pooled"]
