"""Mixtures: the lag rule, shares within 1% over 10,000 samples, prepared sources blended in the loader."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from tests.data.synthetic import counting_store
from zeroforge.data.errors import DataError
from zeroforge.data.loader import BatchLoader, validation_batches
from zeroforge.data.mixture import Mixture, MixtureSchedule, open_split
from zeroforge.data.prepare import prepare
from zeroforge.trainer.config import compose_config


def _greedy(weights: list[Fraction], draws: int) -> list[int]:
    """The rule as the issue states it: each draw goes to the source whose share lags most."""
    counts = [0] * len(weights)
    out = []
    for j in range(draws):
        lags = [w * (j + 1) - c for w, c in zip(weights, counts)]
        best = lags.index(max(lags))
        counts[best] += 1
        out.append(best)
    return out


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [0.7, 0.25, 0.05], [3.0, 1.0]])
def test_schedule_follows_the_lag_rule_with_random_access(weights: list[float]) -> None:
    schedule = MixtureSchedule(weights)
    exact = [Fraction(w).limit_denominator(1000) / sum(Fraction(x).limit_denominator(1000) for x in weights) for w in weights]
    sources, index = schedule.assign(0, 2000)
    assert sources.tolist() == _greedy(exact, 2000)
    # index counts each source's own draws, and any window of draws can be asked for alone.
    for s in range(len(weights)):
        assert index[sources == s].tolist() == list(range(int((sources == s).sum())))
    later_sources, later_index = schedule.assign(1234, 50)
    assert np.array_equal(later_sources, sources[1234:1284]) and np.array_equal(later_index, index[1234:1284])


def test_shares_are_within_one_percent_over_ten_thousand_samples() -> None:
    weights = [0.6, 0.3, 0.1]
    for start in (0, 777_777):
        counts = np.bincount(MixtureSchedule(weights).assign(start, 10_000)[0], minlength=3)
        assert np.abs(counts / 10_000 - weights).max() < 0.01
    schedule = MixtureSchedule(weights)
    assert np.array_equal(schedule.counts(10_000), np.bincount(schedule.assign(0, 10_000)[0]))


def test_bad_weights_are_named() -> None:
    with pytest.raises(DataError, match=r"positive numbers; found \{'a': 1.0, 'b': 0.0\}"):
        MixtureSchedule([1.0, 0.0], ["a", "b"])


def _mixture(tmp_path: Path) -> Mixture:
    # Source b's tokens start at 10**6 so every row says which source it came from.
    a = counting_store(tmp_path / "a", 401, shard_tokens=64)
    b = counting_store(tmp_path / "b", 10**6 + 801, shard_tokens=10**6 + 801)
    b.shards[0] = b.shards[0][10**6 :]
    b.starts = np.cumsum([0, 801])
    return Mixture([a, b], [0.25, 0.75], ["a", "b"], {"fingerprint": "m" * 64})


def test_loader_blends_sources_and_covers_each_once_per_epoch(tmp_path: Path) -> None:
    loader = BatchLoader(_mixture(tmp_path), 8, seed=3, global_batch=20, micro_batch=5, dp_rank=0, dp_size=1)
    rows = torch.cat([torch.cat(loader.next_batch()) for _ in range(10)])  # 200 samples
    from_b = rows[:, 0] >= 10**6
    assert from_b.sum() == 150
    # a has 50 windows and b 100: 50 draws of a are one epoch of a, 150 of b are 1.5 epochs.
    assert sorted((rows[~from_b, 0] // 8).tolist()) == list(range(50))
    assert sorted(((rows[from_b, 0] - 10**6) // 8).tolist()[:100]) == list(range(100))
    assert loader.mixture_shares() == {"a": 0.25, "b": 0.75}


def test_prepared_mixture_trains_and_validates_from_both_sources(tmp_path: Path, data_cache: Path) -> None:
    tokenizer = prepare(compose_config([f"data.cache_dir={data_cache}"]).data) / "tokenizer"
    for name, word in (("code", "def"), ("prose", "the")):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{word} {i} " * 20}) + "\n" for i in range(60)))
    parts = ", ".join(
        f"{{name: {n}, source: json, data_files: [{tmp_path}/{n}.jsonl], weight: {w}}}" for n, w in (("code", 0.7), ("prose", 0.3))
    )
    cfg = compose_config(
        [f"data.cache_dir={tmp_path / 'c'}", f"data.tokenizer={tokenizer}", f"data.mixture=[{parts}]", "data.validation_fraction=0.2"]
    ).data
    out = prepare(cfg)
    train = open_split(out, "train")
    assert isinstance(train, Mixture) and train.names == ["code", "prose"] and train.weights == [0.7, 0.3]
    assert train.manifest["fingerprint"] != train.stores[0].manifest["fingerprint"]
    loader = BatchLoader(train, 16, seed=1, global_batch=10, micro_batch=10, dp_rank=0, dp_size=1)
    loader.next_batch()
    assert loader.mixture_shares() == {"code": 0.7, "prose": 0.3}
    val = torch.cat(validation_batches(open_split(out, "validation"), 16, batch_size=5, num_batches=2))
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    sources = ["code" if "def" in tok.decode(row) else "prose" for row in val]
    assert sources.count("code") == 7 and sources.count("prose") == 3
    with pytest.raises(DataError, match="data.mixture needs one tokenizer"):
        prepare(compose_config([f"data.cache_dir={tmp_path / 'c'}", f"data.mixture=[{parts}]"]).data)
