"""The tfds source: ``tfds.data_source`` (ArrayRecord files, no TensorFlow needed to read them), one record at a time.

A dataset missing under its data_dir is downloaded and prepared there when `download` (`data.download`), unless the
network is plainly unreachable (`network_problem`): tfds's own retries take minutes to give up offline.
"""

from __future__ import annotations

import functools
import os
import socket
import threading

import numpy as np

from extkd_jax.data.sources import KNOWN_NUM_CLASSES, TFDS_NAMES, TFDS_SPLITS, Split, _as_int32_labels, _short

PROBE_HOST = "storage.googleapis.com"  # where tfds fetches MNIST, CIFAR and its own mirrors
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def network_problem(host: str = PROBE_HOST, timeout_s: float = 10.0) -> str | None:
    """Why `host` cannot be reached on port 443 (a few seconds at most), or None when it can, or when a proxy is set
    (then only the download itself can tell)."""
    if any(os.environ.get(v) for v in PROXY_VARS):
        return None
    outcome: list[str | None] = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"cannot reach {host}: {err}")

    thread = threading.Thread(target=probe, daemon=True)  # name resolution itself has no timeout
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else f"cannot reach {host} within {timeout_s:g} s"


class TfdsNotFoundError(FileNotFoundError):
    """A tfds dataset is neither prepared nor downloadable; `reason` says why in a few words."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class TfdsSplit(Split):
    """A tfds split (ArrayRecord), decoded record by record; prepared beforehand, or downloaded when `download`."""

    def __init__(self, name: str, split: str, data_dir, download: bool = False):
        super().__init__()
        try:
            import tensorflow_datasets as tfds  # lazy: the [tfds] extra
        except ImportError as err:
            raise ImportError(
                f"tfds dataset {name!r} needs tensorflow-datasets: pip install 'extkd_jax[tfds]'"
            ) from err
        tfds_split = TFDS_SPLITS.get(name, {}).get(split, split)
        where = data_dir or "$TFDS_DATA_DIR or ~/tensorflow_datasets"
        failure = None
        try:  # prepared already: no network needed
            self.source = tfds.data_source(name, split=tfds_split, data_dir=data_dir or None, download=False)
        except Exception as err:  # noqa: BLE001 - tfds reports an unprepared dataset in many ways (KeyError too)
            if type(err).__name__ == "DatasetNotFoundError":
                raise ValueError(
                    f"unknown tfds dataset {name!r}: tensorflow-datasets has no such dataset (presets and tests use "
                    f"{', '.join(TFDS_NAMES)})"
                ) from None
            failure = f"--config.data.download=False ({_short(err)})"
        if failure and download:
            offline = network_problem()
            failure = f"downloading it is impossible offline ({offline})" if offline else None
            try:
                if not offline:
                    self.source = tfds.data_source(name, split=tfds_split, data_dir=data_dir or None, download=True)
            except Exception as err:  # noqa: BLE001 - a failed download or preparation, however tfds reports it
                failure = f"downloading it failed ({_short(err)})"
        if failure:
            raise TfdsNotFoundError(
                f"tfds dataset {name!r} split {tfds_split!r} is not prepared in ArrayRecord format under {where}, "
                f"and {failure}; prepare it with `tfds build {name} --file_format=array_record --data_dir=...` on a "
                f"machine with internet, or make an npz folder with `extkd data prepare {name} --out=DIR`",
                f"not prepared, and {failure}",
            )
        self.origin = f"tfds {name!r} split {tfds_split!r} under {where}"
        if len(self.source) == 0:
            raise ValueError(f"tfds dataset {name!r} split {tfds_split!r} is empty")
        self.name = name
        self.num_classes = KNOWN_NUM_CLASSES.get(name, 0)
        info = getattr(self.source, "dataset_info", None)
        try:
            self.num_classes = int(info.features["label"].num_classes)
        except (KeyError, AttributeError, TypeError):
            pass
        if not self.num_classes:
            raise ValueError(f"tfds dataset {name!r} has no `label` class feature (its number of classes is unknown)")
        shape = None
        try:
            shape = tuple(info.features["image"].shape)
        except (KeyError, AttributeError, TypeError):
            pass
        self.image_shape = shape if shape and None not in shape else None
        if self.image_shape is not None and len(self.image_shape) == 2:
            self.image_shape = (*self.image_shape, 1)

    def __len__(self) -> int:
        return len(self.source)

    @functools.cached_property
    def labels(self) -> np.ndarray:
        # one record at a time: batched reads (`__getitems__`) are not supported by every data source (the mock)
        return _as_int32_labels(
            np.asarray([int(self.source[i]["label"]) for i in range(len(self.source))]), f"tfds {self.name!r}"
        )

    def record(self, index: int) -> tuple[np.ndarray, int]:
        """(image HWC uint8, label) of one example."""
        record = self.source[int(index)]
        image = np.asarray(record["image"], np.uint8)
        image = image[..., None] if image.ndim == 2 else image
        self.bytes_read += image.nbytes
        return image, int(record["label"])

    def read_one(self, index: int) -> np.ndarray:
        return self.record(index)[0]

    def _read(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices), *self.image_shape), np.uint8)
        for i, index in enumerate(indices):
            out[i] = self.record(index)[0].reshape(self.image_shape)
        return out
