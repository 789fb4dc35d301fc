"""Stop requests (SIGTERM, SIGUSR1) that every rank agrees on at a step boundary.

A scheduler's warning signal may reach one rank, some, or all of them, at any moment. The
handler only sets a flag; at the next step boundary the ranks all-reduce it, so all of them
save the same step and exit together with REQUEUE_EXIT_CODE, which means "requeue me".
"""
from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger("zeroforge")

# EX_TEMPFAIL from sysexits.h: a temporary failure, the caller is invited to retry.
REQUEUE_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped on a signal after committing a checkpoint; a restart resumes from it."""


class StopRequest:
    def __init__(self, device: str):
        self.device = device
        self._requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self._requested = True

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled; every rank must call it."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self._requested  # alone: no tensor, so no GPU sync on the hot path
        flag = torch.tensor([1.0 if self._requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
