"""The hang watchdog: a thread on every rank that ends the rank when it stops making progress.

A rank that wedges (a stopped process, a dead GPU or NIC) leaves every other rank waiting in a
collective until the process group's timeout, and torch's error then names no rank. Here each rank
notes its progress (a training step, with whatever validation, save or export came with it); when
none comes within `cluster.hang_timeout_s` (`cluster.startup_timeout_s` before the first step),
every live rank writes what it was doing to `run.dir/hangs/pending/rank_<k>.json`: each thread's
Python stack, its step, the host of every rank, and the last collectives torch's Flight Recorder
saw on each process group (it records gloo's as well as nccl's). It waits up to HANG_GRACE_S for
the other ranks' dumps, the lowest live rank assembles the report (trainer/hang_report.py), and
the rank exits with HANG_EXIT_CODE, which the launcher and the job script pass on. A rank that is
stopped writes nothing: the report names it by its silence and by the collective it never joined.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("zeroforge")

# What the ranks, zeroforge's torchrun and the job script exit with after a hang: not torchrun's
# generic 1, not a user error (2), not "requeue me" (75).
HANG_EXIT_CODE = 76
# cluster.hang_timeout_s where it is null and no launcher sized it from the plan: DeepSpeed's own
# default collective timeout.
DEFAULT_HANG_TIMEOUT_S = 600
# How long a rank that dumped waits for the other live ranks' dumps before it exits.
HANG_GRACE_S = 10.0
# Flight Recorder entries kept per rank (torch's ring buffer; 0, torch's default, records nothing):
# a hang report keeps the last few of each process group, and the straggler timing reads them all
# every logging interval, at a cost that grows with the buffer (trainer/stragglers.py).
FLIGHT_RECORDER_ENTRIES = 256
# Collectives of each process group a dump keeps, the newest last.
DUMPED_ENTRIES = 8
PENDING = "pending"


def enable_flight_recorder() -> None:
    """Before the process group exists: torch reads the size of its ring buffer then."""
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", str(FLIGHT_RECORDER_ENTRIES))


def node_name() -> str:
    """Where Slurm started this process, Slurm's name for the node (what a job's excluded nodes
    list takes); elsewhere the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def hangs_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "hangs"


def write_json(path: Path, value: dict[str, Any]) -> None:
    """Whole or not at all: a reader (another rank, the launcher) never finds half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=1))
    partial.replace(path)


def flight_recorder() -> dict[str, Any]:
    """The last collectives of each process group, as torch's Flight Recorder holds them."""
    try:
        from torch._C._distributed_c10d import _dump_fr_trace_json  # type: ignore[attr-defined]  # private: no stub

        trace = json.loads(_dump_fr_trace_json(True, False))
    except (ImportError, RuntimeError, ValueError) as err:  # a torch without it, or nothing recorded
        return {"error": str(err)}
    groups: dict[str, list[dict[str, Any]]] = {}
    for entry in trace.get("entries", []):
        name = entry["process_group"][0]
        groups.setdefault(name, []).append(
            {
                "seq": entry["collective_seq_id"],
                "op": entry["profiling_name"],
                "sizes": entry["input_sizes"],
                "state": entry["state"],
                "created_ns": entry["time_created_ns"],
            }
        )
    config = trace.get("pg_config", {})

    def ranks(name: str) -> list[int]:
        found = config.get(name, {}).get("ranks", [])
        return json.loads(found) if isinstance(found, str) else list(found)

    return {"groups": {name: {"ranks": ranks(name), "last": entries[-DUMPED_ENTRIES:]} for name, entries in groups.items()}}


def thread_stacks() -> dict[str, str]:
    names = {t.ident: t.name for t in threading.enumerate()}
    return {
        f"{names.get(ident, 'thread')} ({ident})": "".join(traceback.format_stack(frame)) for ident, frame in sys._current_frames().items()
    }


class Watchdog:
    """Start it once the process group exists; call `progress(step)` after every step."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        rank: int,
        hosts: list[str],
        hang_timeout_s: float,
        startup_timeout_s: float,
    ):
        self.dir = hangs_dir(run_dir)
        self.rank, self.hosts = rank, hosts
        self.hang_timeout_s, self.startup_timeout_s = hang_timeout_s, startup_timeout_s
        self.step: Optional[int] = None
        self.last, self.last_wall = time.monotonic(), time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="zeroforge-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def progress(self, step: int) -> None:
        self.step, self.last, self.last_wall = step, time.monotonic(), time.time()

    @property
    def timeout_s(self) -> float:
        return self.startup_timeout_s if self.step is None else self.hang_timeout_s

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            waited = time.monotonic() - self.last
            if waited > self.timeout_s:
                self.fire(waited)
                return

    def fire(self, waited: float) -> None:
        """Dump, wait for the others' dumps, report (the lowest live rank), exit."""
        from zeroforge.trainer.hang_report import newest_report, write_report

        where = "start-up" if self.step is None else f"after step {self.step}"
        reported = newest_report(self.dir)
        if reported is not None and reported.stat().st_mtime > self.last_wall:
            # This rank was the stopped one and has been continued (Slurm continues a job's stopped
            # processes to end them): the others already reported this hang, naming it.
            log.error("rank %d: no progress for %.0f s (%s); the hang is already reported in %s", self.rank, waited, where, reported)
            os._exit(HANG_EXIT_CODE)
        dump = {
            "rank": self.rank,
            "host": node_name(),
            "pid": os.getpid(),
            "step": self.step,
            "waited_s": round(waited, 1),
            "timeout_s": self.timeout_s,
            "hosts": self.hosts,
            "collectives": flight_recorder(),
            "stacks": thread_stacks(),
        }
        pending = self.dir / PENDING
        pending.mkdir(parents=True, exist_ok=True)
        path = pending / f"rank_{self.rank}.json"
        write_json(path, dump)
        log.error("rank %d: no progress for %.0f s (%s, limit %.0f s); wrote %s", self.rank, waited, where, self.timeout_s, path)
        deadline = time.monotonic() + HANG_GRACE_S
        while len(list(pending.glob("rank_*.json"))) < len(self.hosts) and time.monotonic() < deadline:
            time.sleep(0.5)
        dumped = sorted(int(p.stem.split("_")[1]) for p in pending.glob("rank_*.json"))
        if dumped and dumped[0] == self.rank:
            report = write_report(self.dir)
            if report is not None:
                log.error("%s", report.read_text().rstrip())
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(HANG_EXIT_CODE)  # the main thread is stuck in a collective: no clean exit reaches it
