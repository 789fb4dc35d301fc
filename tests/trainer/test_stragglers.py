"""A rank slowed from outside is named as the straggler; in a normal run no rank is (trainer/stragglers.py)."""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.conftest import read_metrics
from tests.trainer.test_hangs import _kill_tree, _rank_process, _start
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


class Run(NamedTuple):
    run_dir: Path
    output: str
    slowed_at: int  # the step at which the duty cycle began; 0: never slowed


def _duty_cycle(process, stop: threading.Event, period_s: float = 0.08) -> None:
    """Stopped for 7/8 of every period. On the 2-core test machine, shared with the other tests, the
    job's steps then take 2 to 3.5 times as long (a rank stopped part of the time gets more of the
    cores while it runs, so a milder cycle hardly slows it there)."""
    while not stop.is_set():
        process.send_signal(signal.SIGSTOP)
        time.sleep(period_s * 7 / 8)
        process.send_signal(signal.SIGCONT)
        time.sleep(period_s / 8)


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return max((r["step"] for r in read_metrics(run_dir) if "loss" in r), default=0) if path.exists() else 0


@pytest.fixture(scope="module")
def runs(data_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """Two 2-rank jobs at once: one left alone for NORMAL_STEPS steps, one whose rank 1 is slowed
    from its 10th step until it is named (or a minute has passed)."""
    base = tmp_path_factory.mktemp("stragglers")
    common = [f"logging.every={EVERY}", f"logging.straggler_intervals={INTERVALS}"]
    normal = _start(data_cache, base / "normal", [*common, f"train.steps={NORMAL_STEPS}"])
    slowed = _start(data_cache, base / "slowed", common)
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 300
        while _last_step(base / "slowed") < 10:
            assert slowed.poll() is None and time.monotonic() < deadline, "the slowed job did not reach step 10"
            time.sleep(0.2)
        slowed_at = _last_step(base / "slowed")
        cycle = threading.Thread(target=_duty_cycle, args=(_rank_process(slowed, 1), stop), daemon=True)
        cycle.start()
        deadline = time.monotonic() + 60
        while not any(r.get("stragglers") for r in read_metrics(base / "slowed")) and time.monotonic() < deadline:
            time.sleep(0.5)
        stop.set()
        cycle.join()
        _kill_tree(slowed)
        out_slowed = slowed.communicate(timeout=60)[0]
        out_normal = normal.communicate(timeout=600)[0]
    finally:
        stop.set()
        _kill_tree(slowed)
        _kill_tree(normal)
    assert normal.returncode == 0, out_normal[-3000:]
    return {"normal": Run(base / "normal", out_normal, 0), "slowed": Run(base / "slowed", out_slowed, slowed_at)}


def test_a_slowed_rank_is_named_within_a_few_intervals(runs: dict[str, Run]) -> None:
    run = runs["slowed"]
    records = [r for r in read_metrics(run.run_dir) if "own_time_s_max" in r]
    named = [r for r in records if r["stragglers"]]
    assert named, [(r["step"], r["straggler_ratio"]) for r in records]
    first = named[0]
    assert first["stragglers"].startswith("1 (") and first["slowest_rank"] == 1, first
    # Named after INTERVALS slow intervals, allowing one for the interval the cycle began in and two more.
    assert first["step"] <= run.slowed_at + EVERY * (INTERVALS + 3), (run.slowed_at, first)
    assert f"straggler: rank(s) {first['stragglers']} took over 1.5x the median" in run.output
    # The other rank never was.
    assert all(r["stragglers"].startswith("1 (") for r in named)


def test_no_rank_is_named_in_a_normal_run(runs: dict[str, Run]) -> None:
    records = [r for r in read_metrics(runs["normal"].run_dir) if "own_time_s_max" in r]
    assert len(records) == NORMAL_STEPS // EVERY + 1  # step 1, then every EVERY steps
    assert not [r for r in records if r["stragglers"]], [(r["step"], r["straggler_ratio"]) for r in records]
    assert "straggler:" not in runs["normal"].output
