"""`extkd import-torch`: a teacher workdir from torchvision ResNet weights (a PyTorch state_dict file).

The workdir records the file's SHA-256 (config.json, the card and the checkpoint's meta). Step 0 is written once,
so importing another file into an existing workdir would leave the old weights under the new file's name: it is
refused, naming both files and hashes. Every bad file is named as `--weights=<path>` with what was expected.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
from etils import epath

from extkd_jax.models.torch_weights import (
    TORCHVISION_MEAN,
    TORCHVISION_STD,
    WeightsFileError,
    check_finite,
    load_state_dict,
    parse_state_dict,
)
from extkd_jax.train.checkpoint import Checkpointer, checkpoint_dir
from extkd_jax.train.lock import WorkdirLock
from extkd_jax.train.workdir import check_or_write_config, stored_record

log = logging.getLogger(__name__)


def read_weights(weights: str) -> tuple[dict[str, np.ndarray], str]:
    """(state_dict, SHA-256 of the file's bytes) of `--weights`; a ValueError naming the flag and what was wrong."""
    try:
        data = epath.Path(weights).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        raise ValueError(f"--weights={weights}: cannot be read ({type(err).__name__}: {err})") from None
    try:
        state_dict = parse_state_dict(data, weights)
    except WeightsFileError as err:
        raise ValueError(f"--weights={weights}: {err.reason}") from None
    return state_dict, hashlib.sha256(data).hexdigest()


def state_dict_sha256(state_dict: dict[str, np.ndarray]) -> str:
    """SHA-256 over a state_dict given as arrays (names, dtypes, shapes, bytes), for imports without a file."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        array = np.ascontiguousarray(state_dict[name])
        h.update(f"{name}|{array.dtype}|{array.shape}|".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def _has_checkpoint(workdir: epath.Path) -> bool:
    directory = checkpoint_dir(workdir)
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def check_same_weights(workdir: epath.Path, source: str, sha256: str) -> str | None:
    """None when `workdir` holds no imported weights yet (new, or an import stopped before its checkpoint); the
    recorded SHA-256 when it holds these weights already ("" for an older version's import of the same file name,
    which recorded none). Refuses other weights, or a run trained there: step 0 would keep the old weights under
    the new file's name."""
    stored = stored_record(workdir) if (workdir / "config.json").exists() else None
    if stored is None or not _has_checkpoint(workdir):
        return None
    if "imported_from" not in stored:
        raise ValueError(
            f"workdir {workdir} holds a trained `{stored.get('kind')}` run, not imported weights; "
            f"import --weights={source} into a new --workdir"
        )
    old_source, old_sha = stored["imported_from"], stored.get("imported_sha256")
    if old_sha == sha256 or (old_sha is None and old_source == source):
        return old_sha or ""
    raise ValueError(
        f"workdir {workdir} already holds the weights imported from {old_source} "
        f"(SHA-256 {old_sha or 'not recorded'}); --weights={source} is a different file (SHA-256 {sha256}). "
        "A workdir keeps the weights it was made with: import into a new --workdir (or delete this one first)"
    )


def _variables(config, num_classes: int, state_dict: dict[str, np.ndarray], source: str):
    """The model of `config` holding `state_dict`, as variables."""
    from extkd_jax.train.setup import DTYPES, build_model
    from extkd_jax.train.step import split

    model = build_model(config.model.name, config.model.kwargs, num_classes, config.seed, DTYPES[config.compute_dtype])
    try:
        load_state_dict(model, state_dict)
    except ValueError as err:
        raise ValueError(f"--weights={source}: {err}") from None
    return split(model)[1]


def import_teacher(config, weights: str | dict, workdir: str) -> str:
    """A workdir holding the torchvision weights as the trained model of `config` (its `model.name`, classes from
    its data), with torchvision's ImageNet input normalisation: usable as `teacher.workdir`. Rerunning it with the
    same weights changes nothing; other weights are refused."""
    from extkd_jax.data import class_names
    from extkd_jax.data.sources import KNOWN_NUM_CLASSES
    from extkd_jax.train.evaluate import model_card

    if isinstance(weights, str):
        state_dict, sha256 = read_weights(weights)
        source = weights
    else:
        state_dict, sha256, source = weights, state_dict_sha256(weights), "a state_dict"
    try:
        check_finite(state_dict)  # before anything is built or written
    except ValueError as err:
        raise ValueError(f"--weights={source}: {err}") from None
    path = epath.Path(workdir)
    held = check_same_weights(path, source, sha256)
    num_classes = KNOWN_NUM_CLASSES.get(config.data.name, 1000)
    crop = config.data.crop_size or 224
    variables = None if held is not None else _variables(config, num_classes, state_dict, source)
    with WorkdirLock(path, "import-torch"):
        held = check_same_weights(path, source, sha256)  # again, holding the workdir: another import may have won
        recorded = sha256 if held is None else held  # an older version's import keeps claiming no hash
        imported = {"imported_from": source, **({"imported_sha256": recorded} if recorded else {})}
        info = {"num_classes": num_classes, "input_shape": [crop, crop, 3], "drop_classes": [], **imported}
        check_or_write_config(path, config, kind="train", write=True, info=info)
        if held is not None:
            return str(path)  # step 0 holds these weights already
        card = model_card(
            config,
            num_classes,
            (crop, crop, 3),
            TORCHVISION_MEAN,
            TORCHVISION_STD,
            class_names(config.data.name, num_classes),
        )
        if variables is None:  # another import began and stopped between the two checks
            variables = _variables(config, num_classes, state_dict, source)
        checkpointer = Checkpointer(path)
        try:
            items = {"model": variables, "card": {**card, **imported}, "meta": {"imported": json.dumps(info)}}
            checkpointer.save(0, items)
        finally:
            checkpointer.close()
    return str(path)
