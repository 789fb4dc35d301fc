"""Stragglers: the rank the others wait for, named before it slows the whole job or hangs it.

Every logging interval each rank measures its own time: forward, backward, optimizer and waiting
for its batches, apart from the time it spent in collectives waiting for the other ranks. That wait
comes from torch's Flight Recorder (enabled for the hang watchdog), which notes when this rank
entered each collective. The ranks exchange those arrivals: in each collective, the rank that
arrived last waited for nobody, and every other rank waited from its own arrival until that last
one. Own time is the interval less those waits. Hosts' clocks are put on rank 0's by the moment
every rank left the previous interval's exchange (all leave it together).

A rank whose own time over the last `logging.straggler_intervals` intervals together exceeds
`logging.straggler_factor` times the median rank's (the lower middle one for an even count, so
that of two ranks the faster is the measure) is named: in the log, in metrics.jsonl and wandb
(`stragglers`), and as a wandb alert where wandb is online.

Only the newest ARRIVALS collectives of an interval are compared, and their waits are scaled to
the whole interval: the cost stays bounded however many collectives a step makes. Collectives
entered during an evaluation or a save are left out, as that time is.
"""

from __future__ import annotations

import pickle
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

from zeroforge.trainer.distributed import DistInfo, gather
from zeroforge.trainer.watchdog import FLIGHT_RECORDER_ENTRIES

# Collectives per rank and interval whose arrivals are compared: all the recorder keeps.
ARRIVALS = FLIGHT_RECORDER_ENTRIES


@dataclass
class RankTimes:
    """One rank's interval: seconds (evaluation and saves left out), of which data_wait_s waiting
    for batches; the arrivals (ns, this rank's clock) of its newest collectives, keyed by process
    group and sequence number, which cover the last covered_s seconds; and when (ns, this rank's
    clock) it left the previous exchange."""

    seconds: float
    data_wait_s: float
    arrivals: dict[tuple[str, int], int]
    covered_s: float
    left_ns: int


def arrivals_since(since_ns: int, paused: list[tuple[int, int]]) -> tuple[dict[tuple[str, int], int], float]:
    """The newest ARRIVALS collectives this rank entered since `since_ns` (outside the `paused`
    windows), and the seconds from the oldest of them to now."""
    from torch._C._distributed_c10d import _dump_fr_trace  # type: ignore[attr-defined]  # private: no stub

    try:
        entries = pickle.loads(_dump_fr_trace(True, False, False)).get("entries", [])
    except RuntimeError:  # nothing recorded yet
        return {}, 0.0
    now = time.time_ns()
    found: dict[tuple[str, int], int] = {}
    for entry in reversed(entries):
        created = entry["time_created_ns"]
        if created < since_ns or len(found) == ARRIVALS:
            break
        if not entry["is_p2p"] and not any(start <= created < end for start, end in paused):
            found[(entry["process_group"][0], entry["collective_seq_id"])] = created
    oldest = min(found.values(), default=now)
    return found, (now - oldest) / 1e9


def own_seconds(ranks: list[RankTimes]) -> list[float]:
    """Each rank's interval less the time it waited in collectives for the others."""
    offsets = [r.left_ns - ranks[0].left_ns for r in ranks]
    members: dict[str, int] = {}  # ranks that entered any collective of the group
    for r in ranks:
        for group in {g for g, _ in r.arrivals}:
            members[group] = members.get(group, 0) + 1
    waits = [0.0] * len(ranks)
    for key in set().union(*(r.arrivals for r in ranks)):
        present = [(i, r.arrivals[key] - offsets[i]) for i, r in enumerate(ranks) if key in r.arrivals]
        if len(present) < max(2, members[key[0]]):  # not compared where a rank's window missed it
            continue
        last = max(t for _, t in present)
        for i, t in present:
            waits[i] += (last - t) / 1e9
    # Waits seen in the covered part of the interval stand for the whole interval.
    return [max(0.0, r.seconds - w * max(1.0, r.seconds / r.covered_s if r.covered_s else 1.0)) for r, w in zip(ranks, waits)]


class StragglerWatch:
    """Every rank calls `interval(...)` at every logging step; every rank gets the same verdict."""

    def __init__(self, dist: DistInfo, *, factor: Optional[float], intervals: int, hosts: list[str]):
        """factor: None to time and name no rank (the slowest rank's data wait is still found)."""
        self.dist, self.factor, self.intervals, self.hosts = dist, factor, intervals, hosts
        self.recent: deque[list[float]] = deque(maxlen=intervals)
        self._warned: Optional[str] = None
        gather(None, dist)  # the ranks leave together: the first reference of their clocks
        self.left_ns = time.time_ns()

    def interval(self, seconds: float, data_wait_s: float, paused: list[tuple[int, int]]) -> dict[str, Any]:
        """The interval's record fields: the slowest rank's data wait; where timed, own time (median
        and slowest rank) and the ranks named as stragglers (None where none)."""
        # One rank waits for nobody: its own time is the interval.
        timed = self.factor is not None and self.dist.world_size > 1
        arrivals, covered = arrivals_since(self.left_ns, paused) if timed else ({}, seconds)
        ranks: list[RankTimes] = gather(RankTimes(seconds, data_wait_s, arrivals, covered, self.left_ns), self.dist)
        self.left_ns = time.time_ns()
        data_wait = max(r.data_wait_s for r in ranks)
        factor = self.factor
        if factor is None:
            return {"data_wait_s": data_wait}
        own = own_seconds(ranks)
        median = statistics.median_low(own)
        slowest = max(range(len(own)), key=lambda r: own[r])
        # Judged on the last `intervals` intervals together: one noisy interval neither names a
        # rank nor clears it.
        self.recent.append(own)
        named: list[int] = []
        if len(self.recent) == self.intervals:
            totals = [sum(interval[rank] for interval in self.recent) for rank in range(len(own))]
            typical = statistics.median_low(totals)
            named = [rank for rank, total in enumerate(totals) if typical > 0 and total > factor * typical]
        return {
            "own_time_s_median": median,
            "own_time_s_max": own[slowest],
            "slowest_rank": slowest,
            "straggler_ratio": own[slowest] / median if median > 0 else None,
            "data_wait_s": data_wait,
            "stragglers": ", ".join(f"{r} ({self.hosts[r]})" for r in named) or None,
        }

    def warning(self, record: dict[str, Any]) -> Optional[str]:
        """What to warn of where the ranks named differ from the last interval's."""
        named = record.get("stragglers")
        if named is None or named == self._warned:
            self._warned = named
            return None
        self._warned = named
        return (
            f"straggler: rank(s) {named} took over {self.factor}x the median rank's own time over the last "
            f"{self.intervals} logging intervals (compute and data, collective waits left out; this interval "
            f"{record['own_time_s_max']:.3f} s vs {record['own_time_s_median']:.3f} s; logging.straggler_factor, "
            "logging.straggler_intervals)"
        )
