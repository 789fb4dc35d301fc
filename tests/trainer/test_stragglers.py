"""Straggler timing's arithmetic (trainer/stragglers.py); test_stalled_ranks.py slows a real rank."""

from __future__ import annotations

import dataclasses

import pytest

from zeroforge.trainer.distributed import DistInfo
from zeroforge.trainer.stragglers import RankTimes, StragglerWatch, own_seconds

EVERY = 5
NORMAL_STEPS = 200
INTERVALS = 3


def test_own_time_is_the_interval_less_the_waits_for_the_last_arrival() -> None:
    s = 10**9
    # Rank 2 enters both collectives of group "0" half a second after the others; rank 1's clock
    # runs 7 s ahead (it left the last exchange at 7 s on its clock, when the others read 0).
    ranks = [
        RankTimes(4.0, 0.1, {("0", 1): 1 * s, ("0", 2): 2 * s}, covered_s=4.0, left_ns=0),
        RankTimes(4.0, 0.1, {("0", 1): 8 * s, ("0", 2): 9 * s}, covered_s=4.0, left_ns=7 * s),
        RankTimes(4.0, 0.1, {("0", 1): int(1.5 * s), ("0", 2): int(2.5 * s)}, covered_s=4.0, left_ns=0),
    ]
    assert own_seconds(ranks) == pytest.approx([3.0, 3.0, 4.0])
    # Where the compared collectives cover a quarter of the interval, their waits stand for all of it.
    quarter = [dataclasses.replace(r, covered_s=1.0) for r in ranks]
    assert own_seconds(quarter) == pytest.approx([0.0, 0.0, 4.0])
    # A collective one rank's window missed is not compared.
    ranks[0].arrivals.pop(("0", 2))
    assert own_seconds(ranks) == pytest.approx([3.5, 3.5, 4.0])


def test_one_rank_is_never_a_straggler() -> None:
    watch = StragglerWatch(DistInfo(rank=0, world_size=1, local_rank=0), factor=1.5, intervals=1, hosts=["here"])
    record = watch.interval(2.0, 0.5, [])
    assert record["own_time_s_max"] == 2.0 and record["stragglers"] is None and record["data_wait_s"] == 0.5
