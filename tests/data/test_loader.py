"""The sampler: order is a pure function of (seed, epoch, index); ranks split each global batch."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import pytest
import torch

from tests.data.synthetic import counting_store
from zeroforge.data.errors import DataError
from zeroforge.data.loader import BatchLoader, SampleOrder, validation_batches
from zeroforge.data.prepare import prepare
from zeroforge.data.shards import TokenStore
from zeroforge.trainer.config import compose_config


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
    resumed = BatchLoader(
        store, 32, seed=5, global_batch=8, micro_batch=4, dp_rank=0, dp_size=1, consumed_samples=state["consumed_samples"]
    )
    assert torch.equal(torch.cat(resumed.next_batch())[:4], expected)


def test_windows_are_inputs_and_shifted_targets(data_cache: Path) -> None:
    store = _store(data_cache)
    loader = BatchLoader(store, 16, seed=0, global_batch=1, micro_batch=1, dp_rank=0, dp_size=1)
    sample_id = int(loader.rank_sample_ids(0)[0])
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


# The golden sample-id trace, on a store whose token t is t: row[0] // seq_len is the window id.
SEQ = 8
WINDOWS = 96  # six global batches of 16 per epoch


def _counting(tmp_path: Path, **kw) -> TokenStore:
    return counting_store(tmp_path / "counting", WINDOWS * SEQ + 1, shard_tokens=100, **kw)


def _ranks(store: TokenStore, dp_size: int, state: Optional[dict] = None, num_workers: int = 0) -> list[BatchLoader]:
    loaders = [
        BatchLoader(store, SEQ, seed=11, global_batch=16, micro_batch=2, dp_rank=r, dp_size=dp_size, num_workers=num_workers)
        for r in range(dp_size)
    ]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)  # before the first batch: the iterator starts here
    return loaders


def _trace(loaders: list[BatchLoader], steps: int) -> list[list[int]]:
    """Window ids of each global batch, ranks in order."""
    out = []
    for _ in range(steps):
        rows = torch.cat([torch.cat(loader.next_batch()) for loader in loaders])
        assert torch.equal(rows[:, 1:] - rows[:, :-1], torch.ones(len(rows), SEQ, dtype=torch.int64))
        out.append((rows[:, 0] // SEQ).tolist())
    return out


def test_golden_trace_is_the_same_across_world_sizes_and_resumes(tmp_path: Path) -> None:
    store = _counting(tmp_path)
    straight = _trace(_ranks(store, 4), 15)
    # Every window exactly once per epoch (six steps), in a new order each epoch.
    for epoch in range(2):
        assert sorted(sum(straight[epoch * 6 : epoch * 6 + 6], [])) == list(range(WINDOWS))
    assert straight[:6] != straight[6:12]

    four = _ranks(store, 4)
    trace = _trace(four, 4)
    two = _ranks(store, 2, four[0].state_dict())
    trace += _trace(two, 5)
    one = _ranks(store, 1, two[1].state_dict())
    trace += _trace(one, 6)
    assert trace == straight
    assert one[0].state_dict()["consumed_samples"] == 15 * 16


def test_ranks_take_disjoint_slices_of_each_global_batch(tmp_path: Path) -> None:
    loaders = _ranks(_counting(tmp_path), 4)
    for _ in range(3):
        per_rank = [set((torch.cat(loader.next_batch())[:, 0] // SEQ).tolist()) for loader in loaders]
        assert sum(len(ids) for ids in per_rank) == 16 == len(set().union(*per_rank))


def test_workers_build_interleaved_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zeroforge.data import loader as loader_module

    loader = _ranks(_counting(tmp_path), 2)[1]
    steps = loader_module._RankSteps(loader.windows, 32, 16, dp_rank=1, dp_size=2)
    alone = [next(it) for it in [iter(steps)] for _ in range(8)]
    by_worker = {}
    for w in range(4):
        monkeypatch.setattr(loader_module, "get_worker_info", lambda w=w: SimpleNamespace(id=w, num_workers=4))
        it = iter(steps)
        by_worker[w] = [next(it) for _ in range(2)]
    # Worker w builds steps w, w + 4, ... (and no step twice): round robin restores the order.
    for step, rows in enumerate(alone):
        assert torch.equal(by_worker[step % 4][step // 4], rows)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_num_workers_zero_and_four_across_resumes(tmp_path: Path) -> None:
    store = _counting(tmp_path)
    straight = _trace(_ranks(store, 1), 9)
    first = _ranks(store, 1, num_workers=4)
    trace = _trace(first, 3)
    second = _ranks(store, 1, first[0].state_dict())
    trace += _trace(second, 3)
    third = _ranks(store, 2, second[0].state_dict(), num_workers=4)
    trace += _trace(third, 3)
    assert trace == straight


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_a_state_loaded_after_iterating_restarts_there(tmp_path: Path) -> None:
    store = _counting(tmp_path)
    reference = _ranks(store, 1)[0]
    reference.next_batch()
    state = reference.state_dict()
    expected = torch.cat(reference.next_batch())
    loader = _ranks(store, 1, num_workers=2)[0]
    for _ in range(3):
        loader.next_batch()
    loader.load_state_dict(state)
    assert torch.equal(torch.cat(loader.next_batch()), expected)


def test_a_state_for_other_data_is_refused_naming_both(tmp_path: Path) -> None:
    state = _ranks(_counting(tmp_path), 1)[0].state_dict()
    other = counting_store(tmp_path / "other", WINDOWS * SEQ + 1, fingerprint="e" * 64)
    loader = BatchLoader(other, SEQ, seed=11, global_batch=16, micro_batch=2, dp_rank=0, dp_size=1)
    with pytest.raises(DataError, match=r"fingerprint: saved 'f{64}', now 'e{64}'"):
        loader.load_state_dict(state)
    with pytest.raises(DataError, match=r"seq_len: saved 8, now 4"):
        BatchLoader(_counting(tmp_path), 4, seed=11, global_batch=16, micro_batch=2, dp_rank=0, dp_size=1).load_state_dict(state)
