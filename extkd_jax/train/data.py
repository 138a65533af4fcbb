"""A run's data: where its training batches come from (device-resident or streamed), its input normalisation, and
its evaluation splits.

`data.pipeline`: `device` keeps the uint8 transfer set on the devices and gathers batches there (`train.epoch`);
`stream` reads batches while training (`data.stream`, grain) for sets that do not fit; `auto` streams when the
images differ in size or the transfer set is larger than `data.device_budget_gb`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from extkd_jax.data import Datasets, SplitPlan, channel_sums, plan_splits, prepare_datasets, stats_from_sums
from extkd_jax.data.preprocess import Preprocess
from extkd_jax.data.stream import StreamDataset
from extkd_jax.train.epoch import DeviceDataset, make_run_batches, make_run_steps, process_rows, steps_per_epoch

GIB = 2**30


def data_placement(data_config) -> str:
    """`auto`: each process holds only its shard when there are several processes, else replicated."""
    if data_config.placement == "auto":
        return "sharded" if jax.process_count() > 1 else "replicated"
    return data_config.placement


def data_pipeline(data_config, plan: SplitPlan) -> str:
    if data_config.pipeline != "auto":
        return data_config.pipeline
    shape = plan.train_source.image_shape
    size = len(plan.transfer) * int(np.prod(shape)) if shape else None
    return "device" if size is not None and size <= data_config.device_budget_gb * GIB else "stream"


@dataclasses.dataclass
class EvalSplit:
    """One evaluation split: its labels, and its images placed on the mesh or read in batches."""

    labels: np.ndarray
    placed: Any = None  # Predictor.place(images), device pipeline
    batches: Any = None  # callable -> iterator of uint8 batches, stream pipeline


@dataclasses.dataclass
class RunData:
    pipeline: str
    plan: SplitPlan
    datasets: Datasets | None  # the splits in memory (device pipeline)
    mean: np.ndarray
    std: np.ndarray
    input_shape: tuple[int, ...]
    steps_per_epoch: int
    transfer_size: int
    stream: StreamDataset | None = None

    @property
    def num_classes(self) -> int:
        return self.plan.num_classes


def _global_sum(sums: np.ndarray, partial: bool) -> np.ndarray:
    """`sums` added over the processes when each holds only a share."""
    if not partial or jax.process_count() == 1:
        return sums
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(sums)).sum(axis=0)


def _stats_sample(plan: SplitPlan, sample: int, seed: int) -> np.ndarray:
    n = len(plan.transfer)
    return np.arange(n) if not sample or sample >= n else np.sort(np.random.default_rng(seed).permutation(n)[:sample])


def run_data(config, mesh, placement: str, datasets: Datasets | None = None) -> RunData:
    """The data of a run of `config` on `mesh` (`datasets`: splits already read, reused when they fit)."""
    plan = datasets.plan if datasets is not None else plan_splits(config.data)
    pipeline = data_pipeline(config.data, plan)
    preprocess = Preprocess(config.data.crop_size)
    devices = mesh.devices.size
    if pipeline == "device":
        rows = process_rows(len(plan.transfer), mesh) if placement == "sharded" and jax.process_count() > 1 else None
        if datasets is None or (rows is not None and rows != datasets.transfer_rows):
            datasets = prepare_datasets(config.data, rows, plan)
        if config.data.stats_sample:
            raise ValueError("data.stats_sample applies to data.pipeline='stream'; the device pipeline uses all")
        sums = _global_sum(channel_sums(datasets.transfer.images), rows is not None)
        num_steps = steps_per_epoch(len(plan.transfer), config.batch_size, devices, placement)
        shape, stream = tuple(datasets.transfer.images.shape[1:]), None
    else:
        stream = StreamDataset(plan, config.batch_size, mesh, preprocess, config.seed, config.data.read_threads)
        sample = _stats_sample(plan, config.data.stats_sample, config.data.seed)
        share = np.array_split(sample, jax.process_count())[jax.process_index()]  # each process reads a part
        images = [preprocess.eval(plan.train_source.read_one(int(plan.transfer[i]))) for i in share]
        sums = _global_sum(channel_sums(np.stack(images)), True)
        num_steps, shape = stream.steps_per_epoch(), preprocess.shape(plan.train_source.image_shape)
    # normalisation statistics of what this model is trained on (a transfer set lacks some classes)
    mean, std = stats_from_sums(sums)
    return RunData(pipeline, plan, datasets, mean, std, shape, num_steps, len(plan.transfer), stream)


def eval_splits(data: RunData, config, predictor) -> dict[str, EvalSplit]:
    """The validation and test splits, placed once (device pipeline) or read batch by batch each time (stream)."""
    if data.pipeline == "device":
        return {
            name: EvalSplit(ds.labels, placed=predictor.place(ds.images))
            for name in ("val", "test")
            if len(ds := getattr(data.datasets, name))
        }
    preprocess, plan = Preprocess(config.data.crop_size), data.plan
    out = {}
    for name, source, indices in (
        ("val", plan.train_source, plan.val),
        ("test", plan.test_source, np.arange(len(plan.test_source))),
    ):
        if len(indices):

            def batches(source=source, indices=indices) -> Iterator[np.ndarray]:
                for start in range(0, len(indices), predictor.batch_size):
                    chunk = indices[start : start + predictor.batch_size]
                    yield np.stack([preprocess.eval(source.read_one(int(i))) for i in chunk])

            out[name] = EvalSplit(source.labels[indices], batches=batches)
    return out


class Batches:
    """The training batches of one epoch after another, one dispatch (`count` steps) at a time."""

    def __init__(self, data: RunData, step_fn, mesh, config, placement: str):
        from extkd_jax.data.augment import parse_augment

        base, auto, _ = parse_augment(config.data.augment, config.data.name)  # the mix happens in the step
        augment = base + ("+auto" if auto else "")
        self.data, self.key = data, None
        if data.pipeline == "device":
            ds = data.datasets
            self.device = DeviceDataset(
                ds.transfer.images, ds.transfer.labels, mesh, placement, ds.transfer_size, ds.transfer_rows.start
            )
            self._run = make_run_steps(step_fn, mesh, config.batch_size, augment, placement)
        else:
            self._run = make_run_batches(step_fn, mesh, augment)

    def start(self, epoch: int, epoch_key: jax.Array, state: dict | None = None) -> None:
        self.key = epoch_key
        if self.data.pipeline == "device":
            self.perm = self.device.permutation(epoch_key)
        else:
            self.data.stream.start(epoch, epoch_key, state)

    def run(self, state, teacher_variables, offset: int, count: int):
        if self.data.pipeline == "device":
            d = self.device
            return self._run(
                state, teacher_variables, d.images, d.labels, self.perm, self.key, jnp.int32(offset), num_steps=count
            )
        images, labels = self.data.stream.next_batches(count)
        return self._run(state, teacher_variables, images, labels, self.key, jnp.int32(offset))

    def state(self) -> dict:
        """The stream's position, for the checkpoint ({} for the device pipeline: the step says it all)."""
        return self.data.stream.state() if self.data.pipeline == "stream" else {}

    def close(self) -> None:
        if self.data.stream is not None:
            self.data.stream.close()
