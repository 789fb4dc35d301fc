"""The sampler: order is a pure function of (seed, epoch, index); ranks split each global batch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data.loader import BatchLoader, SampleOrder, validation_batches
from data.prepare import prepare
from data.shards import TokenStore
from launcher.config import compose_config


def test_each_sample_exactly_once_per_epoch() -> None:
    order = SampleOrder(num_samples=1000, seed=7)
    for epoch in range(3):
        ids = order.sample_ids(epoch * 1000, 1000)
        assert sorted(ids.tolist()) == list(range(1000))
    assert not np.array_equal(order.sample_ids(0, 1000), order.sample_ids(1000, 1000))


def test_order_is_a_pure_function_of_seed_and_index() -> None:
    a, b = SampleOrder(500, seed=1), SampleOrder(500, seed=1)
    b.sample_ids(1234, 10)  # another position visited first changes nothing
    assert np.array_equal(a.sample_ids(990, 30), b.sample_ids(990, 30))
    assert not np.array_equal(a.sample_ids(0, 30), SampleOrder(500, seed=2).sample_ids(0, 30))


def _store(data_cache: Path) -> TokenStore:
    return TokenStore(prepare(compose_config([f"data.cache_dir={data_cache}"]).data), "train")


def test_ranks_are_disjoint_and_cover_the_global_batch(data_cache: Path) -> None:
    store = _store(data_cache)
    single = BatchLoader(store, 64, seed=3, global_batch=8, micro_batch=2, dp_rank=0, dp_size=1)
    ranks = [BatchLoader(store, 64, seed=3, global_batch=8, micro_batch=2, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(3):
        whole = torch.cat(single.next_batch())
        parts = [torch.cat(r.next_batch()) for r in ranks]
        assert torch.equal(torch.cat(parts), whole)
        assert whole.shape == (8, 65)


def test_resume_from_consumed_samples_is_exact_on_another_world_size(data_cache: Path) -> None:
    store = _store(data_cache)
    straight = BatchLoader(store, 32, seed=5, global_batch=8, micro_batch=2, dp_rank=0, dp_size=2)
    for _ in range(4):
        straight.next_batch()
    state = straight.state_dict()
    assert state["consumed_samples"] == 32 and state["seed"] == 5 and state["seq_len"] == 32
    assert state["fingerprint"] == store.manifest["fingerprint"]
    expected = torch.cat(straight.next_batch())
    resumed = BatchLoader(store, 32, seed=5, global_batch=8, micro_batch=4, dp_rank=0, dp_size=1,
                          consumed_samples=state["consumed_samples"])
    assert torch.equal(torch.cat(resumed.next_batch())[:4], expected)


def test_windows_are_inputs_and_shifted_targets(data_cache: Path) -> None:
    store = _store(data_cache)
    loader = BatchLoader(store, 16, seed=0, global_batch=1, micro_batch=1, dp_rank=0, dp_size=1)
    sample_id = int(loader.order.sample_ids(0, 1)[0])
    row = loader.next_batch()[0][0]
    assert torch.equal(row, torch.from_numpy(store.read(sample_id * 16, 17).astype(np.int64)))


def test_validation_batches_are_fixed(data_cache: Path) -> None:
    val = TokenStore(prepare(compose_config([f"data.cache_dir={data_cache}"]).data), "validation")
    batches = validation_batches(val, 32, batch_size=4, num_batches=3)
    assert len(batches) == 3
    # The first windows of the split, in order: no seed, no shuffling.
    rows = torch.cat(batches)
    for i in range(12):
        assert torch.equal(rows[i], torch.from_numpy(val.read(i * 32, 33).astype(np.int64)))
