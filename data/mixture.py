"""Mixtures: several prepared sources blended by weight, deterministically.

Draw g goes to the source whose realised share lags its weight most (ties: the first source).
That greedy rule is smooth weighted round robin: with integer weights it repeats with a period of
their sum, so the source of any draw, and how many draws each source had before it, are found in
O(1) from g alone. Data order stays a pure function of (seed, epoch, global sample index).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from zeroforge.data.errors import DataError
from zeroforge.data.shards import TokenStore, load_manifest

# Weights are rounded to multiples of 1/_RESOLUTION: shares are exact to 0.01%, and the schedule
# repeats at most every _RESOLUTION draws, so one period is cheap to lay out in full.
_RESOLUTION = 10_000


def _integer_weights(weights: Sequence[float], names: Sequence[str]) -> list[int]:
    if not weights or any(not (w > 0 and math.isfinite(w)) for w in weights):
        raise DataError(f"data.mixture weights must be positive numbers; found {dict(zip(names, weights))}.")
    total = sum(weights)
    exact = [w / total * _RESOLUTION for w in weights]
    ints = [int(x) for x in exact]
    # Largest remainder, so the rounded weights still sum to _RESOLUTION.
    for i in sorted(range(len(exact)), key=lambda i: ints[i] - exact[i])[: _RESOLUTION - sum(ints)]:
        ints[i] += 1
    if min(ints) == 0:
        raise DataError(
            f"data.mixture weights {dict(zip(names, weights))}: a share below 1/{_RESOLUTION} "
            "of the total cannot be scheduled; raise it or drop the source."
        )
    divisor = math.gcd(*ints)
    return [i // divisor for i in ints]


class MixtureSchedule:
    """Which source global draw g comes from, and its index among that source's draws."""

    def __init__(self, weights: Sequence[float], names: Sequence[str] = ()):
        names = list(names) or [str(i) for i in range(len(weights))]
        ints = _integer_weights(weights, names)
        self.period = sum(ints)
        lag = [0] * len(ints)
        self.sources = np.empty(self.period, dtype=np.int64)
        # rank[j]: how many earlier draws of the period went to the same source as draw j.
        self.rank = np.empty(self.period, dtype=np.int64)
        taken = [0] * len(ints)
        for j in range(self.period):
            for s, w in enumerate(ints):
                lag[s] += w
            best = max(range(len(ints)), key=lag.__getitem__)
            lag[best] -= self.period
            self.sources[j], self.rank[j] = best, taken[best]
            taken[best] += 1
        self.per_period = np.asarray(taken, dtype=np.int64)

    def assign(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, index within that source) for draws [start, start + count)."""
        cycle, pos = np.divmod(np.arange(start, start + count, dtype=np.int64), self.period)
        sources = self.sources[pos]
        return sources, cycle * self.per_period[sources] + self.rank[pos]

    def counts(self, draws: int) -> np.ndarray:
        """Draws per source among the first `draws`."""
        cycle, pos = divmod(draws, self.period)
        return cycle * self.per_period + np.bincount(self.sources[:pos], minlength=len(self.per_period))


class Mixture:
    """One split of several prepared sources with weights; used wherever a TokenStore is."""

    def __init__(self, stores: Sequence[TokenStore], weights: Sequence[float], names: Sequence[str], manifest: dict):
        self.stores, self.weights, self.names = list(stores), list(weights), list(names)
        self.manifest = manifest


def open_split(prepared: Path, split: str) -> Union[TokenStore, Mixture]:
    """One split of a prepared directory: a TokenStore, or a Mixture where prepare made one."""
    manifest = load_manifest(prepared)
    if "mixture" not in manifest:
        return TokenStore(prepared, split)
    parts = manifest["mixture"]
    stores = [TokenStore(Path(prepared).parent / part["dir"], split) for part in parts]
    return Mixture(stores, [part["weight"] for part in parts], [part["name"] for part in parts], manifest)
