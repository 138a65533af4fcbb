"""A teacher the user already has: torchvision-layout ResNet weights (a PyTorch state_dict) in our NNX ResNets.

`load_state_dict(model, state_dict)` copies every tensor into the model built by `create_model("resnet18" |
"resnet34" | "resnet50", num_classes)`, converting layouts (conv OIHW -> HWIO, linear (out, in) -> (in, out), BN
weight/bias/running stats -> scale/bias/mean/var) and refusing any missing, extra or misshapen entry by name.
`read_state_dict` reads a `.pth` file with `weights_only=True` (tensors only: a file holding code is refused, not
run) and names what a bad file holds; `train.import_torch` writes the workdir. torch is needed only to read a `.pth`
file (the [torch] extra).
"""

from __future__ import annotations

import io
import re
import warnings
from typing import Any

import numpy as np
from flax import nnx

# torchvision's input normalisation for its ImageNet weights, in pixel units (0..255)
TORCHVISION_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
TORCHVISION_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


class WeightsFileError(ValueError):
    """A weights file that is not a PyTorch state_dict of tensors: `reason` says what it holds instead."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"weights file {path}: {reason}")
        self.path, self.reason = path, reason


EXPECTED = "expected a state_dict of tensors, saved with torch.save(model.state_dict(), path)"


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A PyTorch state_dict file (local or gs://) as name -> numpy array; WeightsFileError when it is none."""
    from etils import epath

    try:
        data = epath.Path(path).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
        raise WeightsFileError(path, f"cannot be read ({type(err).__name__}); {EXPECTED}") from None
    return parse_state_dict(data, path)


def parse_state_dict(data: bytes, path: str = "<bytes>") -> dict[str, np.ndarray]:
    """The state_dict in the bytes of a `.pth` file. Only tensors are unpickled (`weights_only=True`): a file holding
    other Python objects (a whole model, code) is refused, never run."""
    try:
        import torch
    except ImportError as err:
        raise ImportError("reading a PyTorch state_dict needs torch: pip install 'extkd_jax[torch]'") from err
    if not data:
        raise WeightsFileError(path, f"the file is empty; {EXPECTED}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error below says what matters
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises pickle, zip, EOF and key errors for damaged files
        raise WeightsFileError(path, _load_failure(err)) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint {"epoch": ..., "state_dict": ...}
    if not isinstance(state, dict):
        raise WeightsFileError(path, f"it holds a {type(state).__name__}, not a dict of tensors; {EXPECTED}")
    if not state:
        raise WeightsFileError(path, f"it holds an empty dict; {EXPECTED}")
    others = [f"{k!r} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise WeightsFileError(path, f"entries that are not tensors: {shown}; {EXPECTED}")
    return {str(k): _numpy(v) for k, v in state.items()}


def _numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _load_failure(err: Exception) -> str:
    """What torch.load's error means, without torch's advice to retry with weights_only=False (which would run
    whatever code the file holds)."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        name = found.group(1)
        whole = name.startswith(("torch.nn.", "__main__.")) or ".models." in name
        what = "a whole model (saved with torch.save(model))" if whole else "a Python object that is not a tensor"
        return (
            f"it holds {what}: {name}. Only tensors are read from a weights file, so that no code in it runs; "
            + EXPECTED
        )
    if "weights only" in text.lower() or type(err).__name__ == "UnpicklingError":
        return f"it is not a PyTorch file, or holds objects other than tensors (its pickle was refused); {EXPECTED}"
    first = (text.strip().splitlines() or [""])[0]
    first = first.split(". This is an internal")[0][:160]  # miniz's long note on corrupted checkpoints
    return f"it is truncated or not a PyTorch file ({type(err).__name__}: {first or 'no data'}); {EXPECTED}"


def check_finite(state_dict: dict[str, np.ndarray]) -> None:
    """Refuses tensors holding NaN or infinity, naming them (a student of such a teacher never trains)."""
    bad = []
    for name, value in state_dict.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            nan, inf = int(np.isnan(value).sum()), int(np.isinf(value).sum())
            bad.append(f"{name!r} ({nan} NaN, {inf} inf of {value.size})")
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(f"the state_dict holds non-finite values in {len(bad)} tensor(s): {shown}")


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
    check_finite(state_dict)
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
