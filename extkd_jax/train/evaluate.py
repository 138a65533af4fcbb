"""Using trained models: `load(workdir)`, batched prediction over the device mesh, `extkd evaluate`.

A workdir's checkpoint carries everything needed to use its model (the `card` and `model` items, see
`checkpoint.py`): architecture, classes, input shape, normalisation statistics and compute dtype. So

    model = extkd_jax.load("/tmp/mnist_student")
    logits = model(images_uint8_nhwc)                   # (N, num_classes) float32
    logits, segments = model(images, segments=True)
    logits = jax.jit(model.apply)(model.variables, images)  # the same, as a pure function of the variables

works without the training data or the config. `model(...)` checks the pixel values against the card's `input`
(`train/model_input.py`); `model.apply` checks shapes only (its values are traced).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import Mesh

from extkd_jax.models import model_imports
from extkd_jax.train import sharding
from extkd_jax.train.checkpoint import DELETED, Checkpointer
from extkd_jax.train.epoch import make_predict
from extkd_jax.train.metrics import classification_summary
from extkd_jax.train.model_input import DEFAULT_INPUT, check_pixel_range, input_convention
from extkd_jax.train.setup import DTYPES, build_model
from extkd_jax.train.step import Network, split
from extkd_jax.train.workdir import read_config, require_workdir, write_text_atomic

log = logging.getLogger(__name__)


def model_card(config, num_classes: int, input_shape, mean, std, class_names: list[str]) -> dict:
    """What a loader needs to rebuild and feed the model of `config` (stored as the checkpoint's `card`)."""
    from extkd_jax import __version__

    return {
        "model": {
            "name": config.model.name,
            "kwargs": json.loads(json.dumps(config.model.kwargs.to_dict())),
            # what a new process imports to rebuild a model of one's own (models.registry.model_imports)
            "imports": list(model_imports(config.model.name, config.get("imports", ()))),
        },
        "num_classes": int(num_classes),
        "class_names": list(class_names),
        "input_shape": [int(d) for d in input_shape],
        "normalization": {"mean": [float(v) for v in mean], "std": [float(v) for v in std]},
        "input": input_convention(config.data),  # the pixel convention `TrainedModel` checks images against
        "compute_dtype": config.compute_dtype,
        "seed": int(config.seed),
        "dataset": config.data.name,
        "extkd_jax_version": __version__,
    }


def network_of(card: dict, dtype: str | None = None) -> tuple[Network, dict]:
    """(Network, freshly initialised variables) of a card's architecture; `dtype` overrides its compute dtype."""
    compute = DTYPES[dtype or card["compute_dtype"]]
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in card["model"]["kwargs"].items()}
    name, imports = card["model"]["name"], card["model"].get("imports", ())
    model = build_model(name, kwargs, card["num_classes"], card.get("seed", 0), compute, imports)
    graph, variables = split(model)
    norm = card["normalization"]
    return Network(graph, np.asarray(norm["mean"], np.float32), np.asarray(norm["std"], np.float32), compute), variables


@dataclasses.dataclass
class Restored:
    """A workdir's trained model as restored: the newest readable checkpoint `step` of `steps` on disk."""

    network: Network
    variables: dict
    card: dict
    step: int
    steps: list[int]
    meta: dict


# A loader reading a workdir that a trainer is writing may find the step it chose deleted (the trainer keeps
# `keep_checkpoints` steps): it lists the steps again, this many times in all.
RESTORE_ATTEMPTS = 5
CARD_KEYS = (
    "model.name",
    "model.kwargs",
    "num_classes",
    "input_shape",
    "normalization.mean",
    "normalization.std",
    "compute_dtype",
)


def restore_checkpoint(workdir: str | epath.PathLike, dtype: str | None = None) -> Restored:
    """The model of the newest readable checkpoint of a `train`/`distill` workdir, with its step and meta."""
    workdir = require_workdir(workdir)
    record, _ = read_config(workdir)
    if record.get("kind") not in ("train", "distill"):
        raise ValueError(
            f"{workdir} holds a `{record.get('kind')}` run, not one trained model; point to one of "
            f"its runs, e.g. {workdir / 'teacher'} or {workdir / 'runs'}/<method>/seed_0"
        )
    checkpointer = Checkpointer(workdir, create=False)
    try:
        for attempt in range(RESTORE_ATTEMPTS):
            restored = _restore_newest(checkpointer, dtype, last=attempt == RESTORE_ATTEMPTS - 1)
            if restored is not None:
                return restored
    finally:
        checkpointer.close()
    raise RuntimeError(
        f"the checkpoints under {checkpointer.directory} were deleted while being read, {RESTORE_ATTEMPTS} times in "
        f"a row ({checkpointer.describe_failures()}): a run writing this workdir replaces them faster than they can "
        "be read; load it again, or once that run has finished"
    )


def _restore_newest(checkpointer: Checkpointer, dtype: str | None, last: bool) -> Restored | None:
    """The newest readable model in a fresh listing of the steps; None when a step was deleted while being read
    (unless `last`: then an older readable step is returned)."""
    directory = checkpointer.directory
    steps = checkpointer.all_steps(read=True)
    if not steps:
        raise FileNotFoundError(f"no readable checkpoint under {directory}")
    found = checkpointer.restore_latest({"card": None}, steps=steps)
    if found is None:
        if DELETED in checkpointer.failures.values():
            return None
        raise ValueError(
            f"no readable checkpoint under {directory}: every step is unreadable or corrupt "
            f"({checkpointer.describe_failures()})"
        )
    card = found[1]["card"]
    _check_card(card, directory / str(found[0]) / "card" / "metadata")
    network, template = network_of(card, dtype)
    targets = {"card": None, "model": template, "meta": None}
    restored = checkpointer.restore_latest(targets, optional=("meta",), steps=[s for s in steps if s <= found[0]])
    if DELETED in checkpointer.failures.values() and not (last and restored is not None):
        return None
    if restored is None:
        reasons = checkpointer.failures.values()
        if all("tree structures do not match" in r or "not compatible with the stored shape" in r for r in reasons):
            raise ValueError(
                f"the arrays in {directory} do not fit the architecture its card describes "
                f"({card['model']['name']!r}, {card['model']['kwargs']}): another architecture, or an "
                f"edited card ({checkpointer.describe_failures()})"
            )
        raise ValueError(
            f"no checkpoint under {directory} could be restored: every step tried is unreadable or corrupt "
            f"({checkpointer.describe_failures()}); retrain, or restore the workdir from a copy"
        )
    step, items = restored
    return Restored(network, items["model"], items["card"], step, steps, items["meta"] or {})


def _check_card(card: Any, path: epath.Path) -> None:
    """A clear error naming the file and the key when a card lacks what loading the model needs."""
    if not isinstance(card, dict):
        raise ValueError(f"{path} holds {type(card).__name__}, not a model card (a JSON object)")
    for key in CARD_KEYS:
        value: Any = card
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                raise ValueError(
                    f"the model card {path} has no `{key}`: it was not written by extkd_jax, or was edited; "
                    "restore the checkpoint from a copy, or retrain"
                )
            value = value[part]


def restore_model(workdir: str | epath.PathLike, dtype: str | None = None) -> tuple[Network, dict, dict]:
    """(Network, variables, card) of the newest readable checkpoint of a `train`/`distill` workdir."""
    r = restore_checkpoint(workdir, dtype)
    return r.network, r.variables, r.card


class Predictor:
    """Logits of whole image sets, in padded batches spread over the mesh, with one compiled program."""

    def __init__(self, network: Network, mesh: Mesh, batch_size: int):
        n = mesh.devices.size
        self.mesh, self.batch_size = mesh, max(n, (batch_size // n) * n)
        self._predict = make_predict(network.logits, mesh, self.batch_size)

    def place(self, images: np.ndarray) -> tuple[jax.Array, int]:
        """The images padded to whole batches and placed on the mesh, with their true count."""
        extra = (-len(images)) % self.batch_size
        padded = np.concatenate([images, np.zeros((extra, *images.shape[1:]), images.dtype)]) if extra else images
        return sharding.put_replicated(padded, self.mesh), len(images)

    def logits_of(self, variables, split) -> np.ndarray:
        """Logits of an evaluation split (`train.data.EvalSplit`): placed once, or read batch by batch."""
        if split.placed is not None:
            return self.logits(variables, split.placed)
        return np.concatenate([self.logits(variables, self.place(batch)) for batch in split.batches()])

    def logits(self, variables, placed: tuple[jax.Array, int]) -> np.ndarray:
        images, count = placed
        if count == 0:
            return np.zeros((0, 0), np.float32)
        out = [sharding.to_host(self._predict(variables, images, start)) for start in range(0, count, self.batch_size)]
        return np.concatenate(out)[:count]


@dataclasses.dataclass
class TrainedModel:
    """A trained model ready for raw images: `model(images_uint8_nhwc) -> logits` (see the module docstring), and
    `model.apply(model.variables, images)`, the same as a pure function of its variables (jit, vmap, grad)."""

    network: Network
    variables: dict  # {"params", "batch_stats"}: every array of the model (the graph's other state is constant)
    card: dict

    @property
    def class_names(self) -> list[str]:
        return self.card["class_names"]

    @property
    def num_classes(self) -> int:
        return self.card["num_classes"]

    @property
    def input(self) -> dict:
        """The pixel convention it was trained on (uint8 0..255; checkpoints older than the field: the same)."""
        return self.card.get("input") or dict(DEFAULT_INPUT)

    def apply(self, variables: dict, images: Any, segments: bool = False):
        """Logits (N, num_classes) float32 of pixel-valued images (N, H, W, C) (`self.input`: uint8 0..255, or
        floats on that scale), as a pure function of `variables` (`model.variables`); with `segments=True`,
        (logits, [segment arrays]). Jittable (`jax.jit(model.apply, static_argnames="segments")`), vmappable,
        differentiable with respect to float images. Shapes are checked here; values (traced) only by `model(...)`.
        """
        images = self._nhwc(jnp.asarray(images))
        return self.network.outputs(variables, images) if segments else self.network.logits(variables, images)

    def __call__(self, images: Any, *, segments: bool = False, batch_size: int = 500, check_range: bool = True):
        """Logits (N, num_classes) float32 of images (N, H, W, C) with raw pixel values (uint8 0..255, or
        float); with `segments=True`, (logits, [segment arrays]). Images outside the range the model was
        trained on (floats in [0, 1], sklearn's raw 0..16 digits) are refused unless `check_range=False`."""
        images = self._nhwc(np.asarray(images))
        if check_range:
            check_pixel_range(images, self.input)
        outs = [
            self._apply(self.variables, jnp.asarray(images[i : i + batch_size]), segments)
            for i in range(0, len(images), batch_size)
        ]
        if not segments:
            return np.concatenate([np.asarray(o) for o in outs]) if outs else np.zeros((0, self.num_classes))
        logits = np.concatenate([np.asarray(o[0]) for o in outs])
        return logits, [np.concatenate([np.asarray(o[1][k]) for o in outs]) for k in range(len(outs[0][1]))]

    def _nhwc(self, images):
        """`images` with the card's input shape, adding a grayscale channel axis if missing; else ValueError."""
        shape = tuple(self.card["input_shape"])
        if images.ndim == len(shape) and shape[-1] == 1 and tuple(images.shape[1:]) == shape[:-1]:
            images = images[..., None]  # grayscale without its channel axis
        if tuple(images.shape[1:]) != shape:
            raise ValueError(f"images of shape {images.shape}; this model takes (N, *{shape}) with raw pixel values")
        return images

    def __post_init__(self):
        self._apply = jax.jit(self.apply, static_argnames="segments")


def load(workdir: str | epath.PathLike, dtype: str | None = None) -> TrainedModel:
    """The trained model of a `extkd train` / `extkd distill` workdir (local or gs://), ready for raw images."""
    network, variables, card = restore_model(workdir, dtype)
    return TrainedModel(network, variables, card)


def evaluate_workdir(workdir: str | epath.PathLike, config=None) -> dict:
    """`extkd evaluate`: the newest readable checkpoint on the validation and test splits of its (or `config`'s)
    data; records which checkpoint step it scored, and writes `eval.json` into the workdir when it can."""
    from extkd_jax.data import prepare_datasets

    _, stored = read_config(require_workdir(workdir))
    config = config or stored
    restored = restore_checkpoint(workdir)
    newest = max(restored.steps) if restored.steps else restored.step
    if restored.step != newest:
        log.warning(
            "evaluating checkpoint step %d of %s: the newest, step %d, could not be read",
            restored.step,
            workdir,
            newest,
        )
    datasets = prepare_datasets(config.data)
    mesh = sharding.make_mesh()
    predictor = Predictor(restored.network, mesh, config.eval_batch_size)
    variables = sharding.put_replicated(restored.variables, mesh)
    out: dict = {"checkpoint_step": restored.step, "newest_checkpoint_step": newest}
    for split_name in ("val", "test"):
        ds = getattr(datasets, split_name)
        if len(ds):
            logits = predictor.logits(variables, predictor.place(ds.images))
            summary = classification_summary(logits, ds.labels, restored.card["num_classes"], datasets.drop_classes)
            out.update({f"{split_name}_{k}": v for k, v in summary.items()})
    if jax.process_index() == 0:
        path = epath.Path(workdir) / "eval.json"
        try:
            write_text_atomic(path, json.dumps(out, indent=2))
        except OSError as err:  # a read-only workdir: the numbers are still returned (and printed by the CLI)
            log.warning("could not write %s (%s); the evaluation is printed instead", path, err)
    return out
