"""Faults in training: skip an optimizer step whose loss or gradients are bad, stop when it repeats.

A step is skipped when its loss is not finite, its gradient norm is not finite, or (with
train.spike_zscore set) its loss spikes above the recent ones. Every rank takes the same
decision: the loss is averaged across ranks before it is judged, and DeepSpeed's ZeRO optimizers
judge the global gradient norm. A skipped step leaves weights and Adam moments untouched; the
batch is consumed. After train.max_consecutive_skips skipped steps in a row the run stops with
TrainingDiverged, before any checkpoint, so no checkpoint holds what went wrong.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Optional

import torch

from zeroforge.trainer.config import TrainConfig
from zeroforge.trainer.distributed import all_reduce_mean

log = logging.getLogger("zeroforge")


class TrainingDiverged(Exception):
    """Too many optimizer steps in a row were skipped; the message says why."""


class SkippableAdamW(torch.optim.AdamW):
    """torch's AdamW that leaves out a step entirely while `skip` is set.

    DeepSpeed's ZeRO optimizers call step() once per parameter group, so the flag stays set until
    the whole engine step is over (FaultGuard clears it).
    """

    skip = False

    def step(self, closure=None):  # type: ignore[override]
        if self.skip:
            return None
        return super().step(closure)


class FaultGuard:
    def __init__(self, cfg: TrainConfig, optimizer: Optional[torch.optim.Optimizer], stage: int):
        """optimizer: the engine's basic optimizer; stage: its ZeRO stage."""
        self.max_in_a_row = cfg.max_consecutive_skips
        self.zscore = cfg.spike_zscore
        self.window: deque[float] = deque(maxlen=cfg.spike_window)
        # ZeRO-Offload's CPU Adam cannot leave a step out; DeepSpeed still skips non-finite ones.
        self.optimizer = optimizer if isinstance(optimizer, SkippableAdamW) else None
        # Without ZeRO nothing in DeepSpeed looks at the gradient norm before the update: we do.
        self.checks_grad_norm = stage == 0 and optimizer is not None
        self.in_a_row = 0
        self.skipped = 0
        self._loss: Optional[float] = None
        self._reason: Optional[str] = None

    @property
    def judges_before_update(self) -> bool:
        """Whether before_update must see every step (it synchronises the GPU with the host)."""
        return self.optimizer is not None and (self.zscore is not None or self.checks_grad_norm)

    def before_update(self, loss: torch.Tensor, grad_norm: Optional[torch.Tensor]) -> None:
        """Judge the step before its update; every rank calls it with its local mean loss."""
        self._loss = float(all_reduce_mean(loss))
        if not math.isfinite(self._loss):
            self._reason = f"loss is {self._loss}"
        elif grad_norm is not None and not math.isfinite(float(grad_norm)):
            self._reason = f"gradient norm is {float(grad_norm)}"
        elif self.zscore is not None and len(self.window) == self.window.maxlen:
            mean = sum(self.window) / len(self.window)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.window) / len(self.window))
            z = (self._loss - mean) / std if std > 0 else 0.0
            if z > self.zscore:
                self._reason = f"loss {self._loss:.4f} is a spike (z-score {z:.1f} > train.spike_zscore={self.zscore} over the last {len(self.window)} steps, mean {mean:.4f})"
        if self._reason is not None and self.optimizer is not None:
            self.optimizer.skip = True

    def after_update(self, step: int, skipped_by_deepspeed: bool) -> bool:
        """Count the step; True when it was skipped. Raises TrainingDiverged after too many in a row."""
        skipped = self._reason is not None or skipped_by_deepspeed
        reason = self._reason or "gradient norm is not finite"
        if self.optimizer is not None:
            self.optimizer.skip = False
        self._reason = None
        if not skipped:
            self.in_a_row = 0
            if self._loss is not None:
                self.window.append(self._loss)
            return False
        self.skipped += 1
        self.in_a_row += 1
        log.warning("step %d skipped (%s): weights unchanged, batch consumed; %d in a row", step, reason, self.in_a_row)
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingDiverged(
                f"{self.in_a_row} optimizer steps in a row were skipped (train.max_consecutive_skips="
                f"{self.max_in_a_row}), the last at step {step}: {reason}. The newest checkpoint holds the "
                "weights from before; lower optim.lr, raise warmup, or check the data near this step."
            )
        return True
