"""A teacher the user already has: torchvision-layout ResNet weights (a PyTorch state_dict) in our NNX ResNets.

`load_state_dict(model, state_dict)` copies every tensor into the model built by `create_model("resnet18" |
"resnet34" | "resnet50", num_classes)`, converting layouts (conv OIHW -> HWIO, linear (out, in) -> (in, out), BN
weight/bias/running stats -> scale/bias/mean/var) and refusing any missing, extra or misshapen entry by name.
`import_teacher` then writes a workdir that `teacher.workdir` (or `extkd_jax.load`) uses like a trained one.
torch is needed only to read a `.pth` file (the [torch] extra).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from flax import nnx

# torchvision's input normalisation for its ImageNet weights, in pixel units (0..255)
TORCHVISION_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
TORCHVISION_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A PyTorch state_dict file as name -> numpy array."""
    try:
        import torch
    except ImportError as err:
        raise ImportError("reading a PyTorch state_dict needs torch: pip install 'extkd_jax[torch]'") from err
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def _target(model: nnx.Module, name: str) -> tuple[nnx.Variable, np.ndarray | None]:
    """The variable a torchvision key names, and how to reorder the tensor (None: as it is)."""
    *path, leaf = name.split(".")
    module: Any = model
    for part in path:
        if part == "downsample":
            module = module.downsample
            continue
        if part.isdigit() and getattr(module, "conv", None) is not None and isinstance(module.conv, nnx.Conv):
            module = module.conv if part == "0" else module.bn  # downsample.0 = conv, downsample.1 = BN
            continue
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    if isinstance(module, nnx.BatchNorm):
        return getattr(module, _BN[leaf]), None
    if isinstance(module, nnx.Conv):
        return (module.kernel, (2, 3, 1, 0)) if leaf == "weight" else (module.bias, None)
    if isinstance(module, nnx.Linear):
        return (module.kernel, (1, 0)) if leaf == "weight" else (module.bias, None)
    raise KeyError(name)


def load_state_dict(model: nnx.Module, state_dict: dict[str, np.ndarray]) -> nnx.Module:
    """Copies a torchvision ResNet state_dict into `model` (in place; returned for chaining)."""
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    seen = set()
    for name, value in state_dict.items():
        try:
            variable, order = _target(model, name)
        except (KeyError, AttributeError, IndexError, TypeError):
            raise ValueError(f"state_dict entry {name!r} has no counterpart in {type(model).__name__}") from None
        value = np.asarray(value, np.float32)
        value = value.transpose(order) if order is not None else value
        if value.shape != variable.shape:
            raise ValueError(
                f"state_dict entry {name!r} has shape {value.shape} after conversion; the model "
                f"expects {variable.shape}"
            )
        variable[...] = value
        seen.add(id(variable))
    missing = [p for p, v in nnx.iter_graph(model) if isinstance(v, (nnx.Param, nnx.BatchStat)) and id(v) not in seen]
    if missing:
        raise ValueError(f"the state_dict lacks {len(missing)} of the model's arrays, e.g. {missing[:3]}")
    return model


def import_teacher(config, weights: str | dict, workdir: str) -> str:
    """A workdir holding the torchvision weights as the trained model of `config` (its `model.name`, classes from
    its data), with torchvision's ImageNet input normalisation: usable as `teacher.workdir`."""
    from etils import epath

    from extkd_jax.data import class_names
    from extkd_jax.data.sources import KNOWN_NUM_CLASSES
    from extkd_jax.train.checkpoint import Checkpointer
    from extkd_jax.train.evaluate import model_card
    from extkd_jax.train.setup import DTYPES, build_model
    from extkd_jax.train.step import split
    from extkd_jax.train.workdir import check_or_write_config

    num_classes = KNOWN_NUM_CLASSES.get(config.data.name, 1000)
    crop = config.data.crop_size or 224
    model = build_model(config.model.name, config.model.kwargs, num_classes, config.seed, DTYPES[config.compute_dtype])
    load_state_dict(model, read_state_dict(weights) if isinstance(weights, str) else weights)
    _, variables = split(model)
    card = model_card(
        config,
        num_classes,
        (crop, crop, 3),
        TORCHVISION_MEAN,
        TORCHVISION_STD,
        class_names(config.data.name, num_classes),
    )
    path = epath.Path(workdir)
    info = {
        "num_classes": num_classes,
        "input_shape": [crop, crop, 3],
        "drop_classes": [],
        "imported_from": weights if isinstance(weights, str) else "a state_dict",
    }
    check_or_write_config(path, config, kind="train", write=True, info=info)
    checkpointer = Checkpointer(path)
    try:
        checkpointer.save(0, {"model": variables, "card": card, "meta": {"imported": json.dumps(info)}})
    finally:
        checkpointer.close()
    return str(path)
