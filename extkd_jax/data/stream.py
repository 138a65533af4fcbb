"""The streaming input pipeline, for training sets that do not fit on the devices (`data.pipeline='stream'`).

Built on grain: each process reads only its share of every global batch from the source (npz rows or tfds
records), in threads, a few batches ahead, and puts them on its devices ahead of the step (prefetch to device).
The order is the device-resident pipeline's (`train.epoch`): epoch `e` visits `permutation(fold_in(key_e,
PERMUTATION_STREAM), n)` in batches, so with the same seed both pipelines train on the same batches, and the same
jitted augmentation runs on them. The iterator's state goes into every checkpoint (`state()` / `restore()`), so a
resumed run continues with exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from extkd_jax.data.pipeline import SplitPlan
from extkd_jax.data.preprocess import Preprocess

PERMUTATION_STREAM = 0x5EED  # the same stream as the device pipeline's permutation (train.epoch)
DATA_AXIS = "data"


@jax.jit
def _stack(*batches):
    return jax.numpy.stack(batches)


def _grain():
    try:
        import grain
        from grain.experimental import ThreadPrefetchIterDataset
    except ImportError as err:
        raise ImportError("data.pipeline='stream' needs grain: pip install 'extkd_jax[stream]'") from err
    return grain, ThreadPrefetchIterDataset


class StreamDataset:
    """Global batches of the transfer set of `plan`, this process reading only its rows of each."""

    def __init__(
        self,
        plan: SplitPlan,
        batch_size: int,
        mesh: Mesh,
        preprocess: Preprocess,
        seed: int,
        read_threads: int = 8,
        host_prefetch: int = 4,
        device_prefetch: int = 2,
    ):
        self.plan, self.mesh, self.preprocess, self.seed = plan, mesh, preprocess, seed
        self.batch_size, self.num_examples = batch_size, len(plan.transfer)
        processes, index = jax.process_count(), jax.process_index()
        if batch_size % processes:
            raise ValueError(f"batch_size={batch_size} is not divisible by the {processes} processes")
        self.local_batch = batch_size // processes
        self.local_columns = slice(index * self.local_batch, (index + 1) * self.local_batch)
        self.sharding = NamedSharding(mesh, P(DATA_AXIS))
        self.read_threads, self.host_prefetch, self.device_prefetch = read_threads, host_prefetch, device_prefetch
        self._epoch, self._iterator = None, None

    def steps_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    def _epoch_order(self, epoch_key: jax.Array) -> np.ndarray:
        """(steps, local batch) positions in the transfer set: this process's columns of every global batch."""
        key = jax.random.fold_in(epoch_key, PERMUTATION_STREAM)
        perm = np.asarray(jax.device_get(jax.random.permutation(key, self.num_examples)))
        steps = self.steps_per_epoch()
        return perm[: steps * self.batch_size].reshape(steps, self.batch_size)[:, self.local_columns]

    def _read(self, position: int, epoch: int) -> tuple[np.ndarray, np.int32]:
        index = int(self.plan.transfer[position])
        rng = np.random.default_rng([self.seed, epoch, index])  # host-side randomness, whatever thread reads it
        image = self.preprocess.train(self.plan.train_source.read_one(index), rng)
        return image, np.int32(self.plan.train_source.labels[index])

    def _global(self, batch):
        images, labels = batch
        return (
            jax.make_array_from_process_local_data(self.sharding, images),
            jax.make_array_from_process_local_data(self.sharding, labels),
        )

    def start(self, epoch: int, epoch_key: jax.Array, state: dict | None = None) -> None:
        """Begins epoch `epoch` (from the saved `state` of a resumed run, else from its first batch)."""
        grain, ThreadPrefetchIterDataset = _grain()
        order = self._epoch_order(epoch_key).reshape(-1)
        ds = grain.MapDataset.source(order).map(lambda p: self._read(int(p), epoch))
        ds = ds.batch(self.local_batch, drop_remainder=True, batch_fn=lambda xs: tuple(np.stack(a) for a in zip(*xs)))
        ds = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=self.read_threads, prefetch_buffer_size=self.host_prefetch)
        )
        ds = ThreadPrefetchIterDataset(ds.map(self._global), prefetch_buffer_size=self.device_prefetch)
        self.close()
        self._iterator, self._epoch = iter(ds), epoch
        if state is not None:
            if state.get("epoch") != epoch:
                raise ValueError(f"the checkpoint's data iterator is at epoch {state.get('epoch')}, the run at {epoch}")
            self._iterator.set_state(json.loads(state["iterator"]))

    def next_batches(self, count: int) -> tuple[jax.Array, jax.Array]:
        """The next `count` global batches stacked: images (count, B, ...), labels (count, B)."""
        batches = [next(self._iterator) for _ in range(count)]
        return _stack(*[b[0] for b in batches]), _stack(*[b[1] for b in batches])

    def state(self) -> dict:
        """What the checkpoint keeps: the epoch and the grain iterator's position in it."""
        return {"epoch": self._epoch, "iterator": json.dumps(self._iterator.get_state())}

    def close(self) -> None:
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None
