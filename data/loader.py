"""The sampler: which samples each rank trains on, as a pure function of (seed, epoch, index).

A sample is a window of seq_len + 1 tokens of the concatenated split (inputs and shifted targets).
Global batch b owns global sample indices [b*G, (b+1)*G); data-parallel rank r takes the r-th
contiguous slice of it and splits that into micro-batches. The only state is consumed_samples,
so a resume is exact on any world size that divides the global batch.
"""
from __future__ import annotations

import numpy as np
import torch

from data.errors import DataError
from data.shards import TokenStore


class SampleOrder:
    """sample_id(g) = permutation(seed, epoch = g // n)[g % n] over the n windows of the split."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed = num_samples, seed
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._epoch, self._perm = epoch, rng.permutation(self.num_samples)
        return self._perm

    def sample_ids(self, start: int, count: int) -> np.ndarray:
        ids = np.empty(count, dtype=np.int64)
        for i, g in enumerate(range(start, start + count)):
            epoch, pos = divmod(g, self.num_samples)
            ids[i] = self._permutation(epoch)[pos]
        return ids


def num_windows(store: TokenStore, seq_len: int) -> int:
    return (len(store) - 1) // seq_len


class BatchLoader:
    def __init__(
        self,
        store: TokenStore,
        seq_len: int,
        seed: int,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        consumed_samples: int = 0,
    ):
        n = num_windows(store, seq_len)
        if n < 1:
            raise DataError(
                f"the train split has {len(store)} tokens, fewer than one sample of "
                f"data.seq_len + 1 = {seq_len + 1}; use more data or a shorter seq_len."
            )
        self.store, self.seq_len = store, seq_len
        self.order = SampleOrder(n, seed)
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = consumed_samples

    def window(self, sample_id: int) -> np.ndarray:
        return self.store.read(int(sample_id) * self.seq_len, self.seq_len + 1)

    def rank_sample_ids(self, consumed_samples: int) -> np.ndarray:
        """This rank's slice of the global batch that starts at consumed_samples."""
        per_rank = self.global_batch // self.dp_size
        return self.order.sample_ids(consumed_samples + self.dp_rank * per_rank, per_rank)

    def next_batch(self) -> list[torch.Tensor]:
        """The micro-batches ([micro_batch, seq_len + 1] token ids) of this rank's next step."""
        ids = self.rank_sample_ids(self.consumed_samples)
        self.consumed_samples += self.global_batch
        rows = np.stack([self.window(i) for i in ids]).astype(np.int64)
        return list(torch.from_numpy(rows).split(self.micro_batch))

    def state_dict(self) -> dict:
        return {
            "consumed_samples": self.consumed_samples,
            "seed": self.order.seed,
            "fingerprint": self.store.manifest["fingerprint"],
            "seq_len": self.seq_len,
        }


def validation_batches(store: TokenStore, seq_len: int, batch_size: int, num_batches: int) -> list[torch.Tensor]:
    """A fixed set of held-out windows, in order: the same numbers on every run."""
    available = num_windows(store, seq_len)
    count = min(available, batch_size * num_batches)
    if count < 1:
        raise DataError(
            f"the validation split has {len(store)} tokens, fewer than one sample of "
            f"data.seq_len + 1 = {seq_len + 1}."
        )
    rows = np.stack([store.read(i * seq_len, seq_len + 1) for i in range(count)]).astype(np.int64)
    return list(torch.from_numpy(rows).split(batch_size))
