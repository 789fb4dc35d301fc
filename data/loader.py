"""The sampler: which samples each rank trains on, as a pure function of (seed, epoch, index).

A sample is a window of seq_len + 1 tokens of the concatenated split (inputs and shifted targets).
Global batch b owns global sample indices [b*G, (b+1)*G); data-parallel rank r takes the r-th
contiguous slice of it and splits that into micro-batches. With dataloader workers, worker w of W
builds the steps w, w+W, w+2W, ... counted from where the loader started, and the DataLoader hands
them back in step order. The only state is consumed_samples (with the seed, seq_len and data
fingerprint it refers to), so a resume is exact on any world size that divides the global batch
and any number of workers.
"""

from __future__ import annotations

from typing import Iterator, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from zeroforge.data.errors import DataError
from zeroforge.data.mixture import Mixture, MixtureSchedule
from zeroforge.data.shards import TokenStore

Source = Union[TokenStore, Mixture]


class SampleOrder:
    """sample_id(g) = permutation(seed, stream, epoch = g // n)[g % n] over the n windows of a split."""

    def __init__(self, num_samples: int, seed: int, stream: int = 0):
        self.num_samples, self.seed, self.stream = num_samples, seed, stream
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, self.stream, epoch]))
            self._epoch, self._perm = epoch, rng.permutation(self.num_samples)
        return self._perm

    def sample_ids(self, start: int, count: int) -> np.ndarray:
        return self.lookup(np.arange(start, start + count, dtype=np.int64))

    def lookup(self, indices: np.ndarray) -> np.ndarray:
        """Sample ids of the given draw indices (any order, any epochs)."""
        epochs, pos = np.divmod(indices, self.num_samples)
        ids = np.empty(len(indices), dtype=np.int64)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            ids[where] = self._permutation(int(epoch))[pos[where]]
        return ids


def num_windows(store: TokenStore, seq_len: int) -> int:
    return (len(store) - 1) // seq_len


def _stores_and_weights(source: Source) -> tuple[list[TokenStore], list[float], list[str]]:
    if isinstance(source, Mixture):
        return source.stores, source.weights, source.names
    return [source], [1.0], ["data"]


class Windows:
    """Global sample index -> window, through the mixture schedule and each source's epoch order."""

    def __init__(self, source: Source, seq_len: int, seed: int):
        self.stores, weights, self.names = _stores_and_weights(source)
        for store in self.stores:
            if num_windows(store, seq_len) < 1:
                raise DataError(
                    f"{store.prepared}: the {store.split} split has {len(store)} tokens, fewer than one sample of "
                    f"data.seq_len + 1 = {seq_len + 1}; use more data or a shorter seq_len."
                )
        self.seq_len, self.seed = seq_len, seed
        self.schedule = MixtureSchedule(weights, self.names)
        self.orders = [SampleOrder(num_windows(s, seq_len), seed, stream=i) for i, s in enumerate(self.stores)]

    def sample_ids(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, window id in that source) of global samples [start, start + count)."""
        sources, draws = self.schedule.assign(start, count)
        ids = np.empty(count, dtype=np.int64)
        for s in np.unique(sources):
            where = sources == s
            ids[where] = self.orders[int(s)].lookup(draws[where])
        return sources, ids

    def read(self, start: int, count: int) -> np.ndarray:
        """[count, seq_len + 1] token ids of global samples [start, start + count)."""
        sources, ids = self.sample_ids(start, count)
        rows = np.empty((count, self.seq_len + 1), dtype=np.int64)
        for i, (s, sample_id) in enumerate(zip(sources.tolist(), ids.tolist())):
            rows[i] = self.stores[s].read(sample_id * self.seq_len, self.seq_len + 1)
        return rows


class _RankSteps(IterableDataset):
    """This rank's rows of every step from first_sample on; worker w of W yields steps w::W."""

    def __init__(self, windows: Windows, first_sample: int, global_batch: int, dp_rank: int, dp_size: int):
        super().__init__()
        self.windows, self.first_sample = windows, first_sample
        self.global_batch, self.per_rank = global_batch, global_batch // dp_size
        self.offset = dp_rank * self.per_rank

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        step, stride = (info.id, info.num_workers) if info is not None else (0, 1)
        while True:
            start = self.first_sample + step * self.global_batch + self.offset
            yield torch.from_numpy(self.windows.read(start, self.per_rank))
            step += stride


def check_batch_split(global_batch: int, micro_batch: int, dp_size: int) -> None:
    """Every rank takes whole micro-batches of an equal slice of each global batch."""
    if global_batch % dp_size or (global_batch // dp_size) % micro_batch:
        raise DataError(f"global batch {global_batch} must split into {dp_size} ranks of whole micro-batches of {micro_batch}.")


class BatchLoader:
    """This rank's micro-batches, step after step; its iterator starts at the first next_batch(),
    so a state loaded before that (load_state_dict) decides where it begins."""

    def __init__(
        self,
        store: Source,
        seq_len: int,
        seed: int,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        consumed_samples: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        check_batch_split(global_batch, micro_batch, dp_size)
        self.windows = Windows(store, seq_len, seed)
        self.fingerprint = store.manifest["fingerprint"]
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.consumed_samples = consumed_samples
        self._steps: Optional[Iterator[torch.Tensor]] = None

    @property
    def seq_len(self) -> int:
        return self.windows.seq_len

    def rank_sample_ids(self, consumed_samples: int) -> np.ndarray:
        """Window ids of this rank's slice of the global batch that starts at consumed_samples."""
        per_rank = self.global_batch // self.dp_size
        return self.windows.sample_ids(consumed_samples + self.dp_rank * per_rank, per_rank)[1]

    def _start(self) -> Iterator[torch.Tensor]:
        steps = _RankSteps(self.windows, self.consumed_samples, self.global_batch, self.dp_rank, self.dp_size)
        if self.num_workers == 0:
            return iter(steps)
        loader = DataLoader(
            steps,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=2,
        )
        return iter(loader)

    def next_batch(self) -> list[torch.Tensor]:
        """The micro-batches ([micro_batch, seq_len + 1] token ids) of this rank's next step."""
        if self._steps is None:
            self._steps = self._start()
        rows = next(self._steps)
        self.consumed_samples += self.global_batch
        return list(rows.split(self.micro_batch))

    def state_dict(self) -> dict:
        return {
            "consumed_samples": self.consumed_samples,
            "seed": self.windows.seed,
            "fingerprint": self.fingerprint,
            "seq_len": self.seq_len,
        }

    @staticmethod
    def global_state(states: list[dict]) -> dict:
        """The state of the whole job from every rank's state_dict(): they are all the same."""
        return states[0]

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved state; refuses one saved for other data, seq_len or seed."""
        now = self.state_dict()
        differs = [
            f"{key}: saved {state.get(key)!r}, now {now[key]!r}" for key in ("fingerprint", "seq_len", "seed") if state.get(key) != now[key]
        ]
        if differs:
            raise DataError("the saved data state belongs to other data; " + "; ".join(differs) + ".")
        self.consumed_samples = int(state["consumed_samples"])
        self._steps = None  # a running iterator (and its workers) is at the old position

    def mixture_shares(self) -> dict[str, float]:
        """Realised share of each source among the samples consumed so far."""
        counts = self.windows.schedule.counts(self.consumed_samples)
        total = max(int(counts.sum()), 1)
        return {name: int(c) / total for name, c in zip(self.windows.names, counts)}


def validation_batches(store: Source, seq_len: int, batch_size: int, num_batches: int) -> list[torch.Tensor]:
    """A fixed set of held-out windows, in order: the same numbers on every run.

    From a mixture, draw j is the next unused window of the source the schedule gives it.
    """
    stores, weights, names = _stores_and_weights(store)
    available = [num_windows(s, seq_len) for s in stores]
    for s, n in zip(stores, available):
        if n < 1:
            raise DataError(
                f"{s.prepared}: the {s.split} split has {len(s)} tokens, fewer than one sample of data.seq_len + 1 = {seq_len + 1}."
            )
    count = min(sum(available), batch_size * num_batches)
    sources, draws = MixtureSchedule(weights, names).assign(0, count)
    rows = np.stack([stores[s].read((k % available[s]) * seq_len, seq_len + 1) for s, k in zip(sources.tolist(), draws.tolist())]).astype(
        np.int64
    )
    return list(torch.from_numpy(rows).split(batch_size))
