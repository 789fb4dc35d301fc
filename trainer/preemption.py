"""Stop requests (SIGTERM, SIGUSR1, a stop file) that every rank agrees on at a step boundary.

A scheduler's warning signal may reach one rank, some, or all of them, at any moment. The
handler only sets a flag; at the next step boundary the ranks all-reduce it, so all of them
save the same step and exit together with REQUEUE_EXIT_CODE, which means "requeue me".

Under torchrun a signal cannot be relied on to reach the trainers (torchrun dies of SIGUSR1 and
kills its workers 30 s after a SIGTERM), and torchrun turns every worker's exit code into 1. So
slurm/pretrain.sh asks through a file instead (STOP_FILE in the run directory), and the trainer
answers through another (REQUEUE_FILE), written only once the checkpoint has committed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from types import FrameType
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger("zeroforge")

# EX_TEMPFAIL from sysexits.h: a temporary failure, the caller is invited to retry.
REQUEUE_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# `touch <run.dir>/stop-requested` stops a run gracefully: it saves, then exits to be requeued.
STOP_FILE = "stop-requested"
# Written after the stop's checkpoint committed: "continue me from it".
REQUEUE_FILE = "requeue.json"


class Preempted(Exception):
    """Training stopped on request after committing a checkpoint; a restart resumes from it."""


class StopRequest:
    def __init__(self, device: str, run_dir: str | Path, rank: int):
        self.device = device
        self.run_dir = Path(run_dir)
        # Rank 0 alone looks for the stop file: one stat per step on a shared filesystem, not one per rank.
        self.is_main = rank == 0
        self._requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self._requested = True

    def _local(self) -> bool:
        return self._requested or (self.is_main and (self.run_dir / STOP_FILE).exists())

    def agreed(self) -> bool:
        """True on every rank when any rank was asked to stop; every rank must call it."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self._local()  # alone: no tensor, so no GPU sync on the hot path
        flag = torch.tensor([1.0 if self._local() else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def request_requeue(self, step: int, reason: str) -> None:
        """After a committed checkpoint: clear the stop request and ask the job script to requeue."""
        if not self.is_main:
            return
        (self.run_dir / STOP_FILE).unlink(missing_ok=True)
        tmp = self.run_dir / f"{REQUEUE_FILE}.tmp"
        tmp.write_text(json.dumps({"step": step, "reason": reason}) + "\n")
        with open(tmp) as f:
            os.fsync(f.fileno())
        tmp.replace(self.run_dir / REQUEUE_FILE)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
