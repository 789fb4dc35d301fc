"""The run's own resumable state, beside the engine's (weights, optimizer, scheduler), which
DeepSpeed saves: one object that the checkpointer saves and loads, each part from its owner."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from zeroforge.trainer.distributed import DistInfo, gather


@dataclass
class TrainState:
    """Everything a resume restores besides the engine: the same step, tokens, data position,
    random streams and skip count as the run that saved it."""

    step: int = 0
    tokens: int = 0
    # The data loader's global_state(): its position, and what it refers to (data/ owns the keys).
    data: dict[str, Any] = field(default_factory=lambda: {"consumed_samples": 0})
    # Every rank's RNG states in rank order: rank 0's checkpoint file alone restores all of them.
    rng: list[dict[str, Any]] = field(default_factory=list)
    skipped_steps: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TrainState:
        """From a checkpoint's client state (which holds more: the run's identity)."""
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})

    def restore_rng(self, dist: DistInfo) -> None:
        """This rank's random streams as saved; on another world size ranks keep their fresh seeds."""
        if len(self.rng) == dist.world_size:
            set_rng_state(self.rng[dist.rank])


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gathered_rng_states(dist: DistInfo) -> list[dict[str, Any]]:
    """Every rank's RNG states, in rank order, on every rank."""
    return gather(rng_state(), dist)
