"""extkd_jax: knowledge distillation of image classifiers in JAX / Flax NNX.

Importing the package imports nothing heavy: `from extkd_jax.losses import kd_kl` needs only jax and chex.
The Python API (the training extras; imported when first used):

    extkd_jax.configs.get(name, variant=None, **overrides)   a preset's ConfigDict ("digits_omit3", "teacher")
    extkd_jax.train(config, workdir)      trains (loss.name 'ce') or distils (a teacher loss) one model
    extkd_jax.reproduce(config, workdir)  the dark-knowledge experiment of an experiment preset
    extkd_jax.load(workdir)               the trained model, callable on raw images; `model.apply` is pure
    extkd_jax.register_method(method)     adds a KD method of one's own (an extkd_jax.methods.Method; see
                                          examples/custom_method.py); `config.imports` names its module
"""

from __future__ import annotations

__version__ = "0.2.0"

# The presets live in <repo>/configs: setup.cfg's package_dir maps them to extkd_jax.configs, in the wheel and in the
# editable install (`pip install -e .`). A checkout used without installing it has no extkd_jax.configs.


def load(workdir, dtype: str | None = None):
    """The trained model of an `extkd train` / `extkd distill` workdir, callable on raw uint8 NHWC images
    (see extkd_jax.train.evaluate.TrainedModel)."""
    from extkd_jax._extras import needs_extras

    with needs_extras("extkd_jax.load"):  # a losses-only install: the error names the extra to install
        from extkd_jax.train.evaluate import load as _load

        return _load(workdir, dtype)


def __getattr__(name: str):
    """`train`, `reproduce` and `configs` on first use, so that `import extkd_jax` stays light."""
    import importlib

    if name in ("train", "configs"):  # subpackages; `extkd_jax.train` is callable (extkd_jax/train/__init__.py)
        return importlib.import_module(f"{__name__}.{name}")
    if name in ("register_method", "Method"):  # the method registry (extkd_jax/methods): a plug-in's entry point
        from extkd_jax import methods

        return getattr(methods, name)
    if name == "reproduce":
        from extkd_jax.api import reproduce

        return reproduce
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
