"""Learning-rate schedules as pure functions of the optimizer step."""

from __future__ import annotations

import math
from typing import Callable

from zeroforge.trainer.config import OptimConfig, Schedule


def lr_factor(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of cfg.lr after `step` optimizer steps (LambdaLR's convention: 0 before the first)."""
    warmup = max(0, cfg.warmup_steps)
    floor = cfg.min_lr_ratio
    schedule = Schedule(cfg.schedule)
    decay = decay_steps(cfg, total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule is Schedule.constant:
            return 1.0
        if schedule is Schedule.cosine:
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        decay_start = max(warmup, total_steps - decay)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return 1.0 - (1.0 - floor) * progress

    return factor


def decay_steps(cfg: OptimConfig, total_steps: int) -> int:
    """The wsd schedule's decay: the last decay_fraction of the steps, at least one."""
    return max(1, round(cfg.decay_fraction * total_steps))
