"""Resuming on another world size: DeepSpeed's universal checkpoint, converted before the ranks start.

A ZeRO checkpoint holds each rank's shard of the optimizer state, cut for the world size that
saved it. DeepSpeed's ds_to_universal rewrites it per parameter, which any world size loads
(with "load_universal" in the engine's config). The launcher converts it (launcher/preflight.py:
`zeroforge launch` before torchrun, the Slurm job on its batch host before srun, and `zeroforge
universal` for ranks started by hand) into <checkpoint>/universal under a temporary name, with
as many workers as a node's host memory allows and within a time limit; later resumes reuse it,
and retention removes it with its checkpoint. The ranks only load it (universal_checkpoint): a
rank never converts, since the others would wait in a collective, their GPUs idle, for as long
as that takes. The converter runs with its loads made weights-only (trainer/safe_load.py).

What the converter holds at once (DeepSpeed 0.19's ds_to_universal, read for this):
- extracting, each of its --num_extract_workers processes loads one rank's optimizer-state file
  whole (fp32 master, Adam m and v: 12 bytes a parameter over the ranks that saved it), copies
  one of its three states again to strip ZeRO-1/2's padding, and copies one parameter's fragment
  at a time out of it;
- merging, each of its --num_merge_workers processes loads one state's fragments of one
  parameter and concatenates them (at ZeRO 1-2 twice) while the previous state's result is
  still held: four fp32 copies of the largest parameter;
- its main process alone reads the module file (ZeRO 0-2: the whole model in its dtype; ZeRO-3's
  hold shapes only), then rank 0's optimizer-state file; what it freed of the first is not all
  handed back to the system before the second (measured), so both count.
Each process also holds its own Python, torch and DeepSpeed. Nothing loads every shard together:
the peak is the highest of the three, and the workers are chosen so that it fits (plan_conversion).
Measured on a 125M-parameter ZeRO-2 checkpoint of 2 ranks: 1.10 GiB with 1 worker each (bound
1.5 GiB), 1.64 GiB with 2 each (bound 2.8 GiB).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import runpy
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol

import torch

from zeroforge.trainer.config import ConfigError
from zeroforge.trainer.distributed import DistInfo, from_rank_zero
from zeroforge.trainer.safe_load import weights_only_loads

log = logging.getLogger("zeroforge")

UNIVERSAL = "universal"
GIB = 2**30
# DeepSpeed's own defaults for the converter's two pools: the most workers a conversion gets.
MAX_EXTRACT_WORKERS = 4
MAX_MERGE_WORKERS = 2
# One converter process before it loads a file: Python, torch and DeepSpeed on the CPU (0.25 GiB
# measured), with room for a CUDA build's host-side libraries, which it loads but never uses.
PROCESS_GIB = 0.5
# The default time limit (checkpoint.universal_timeout_s=null): a shared filesystem under other
# jobs' load, written in the converter's many small fragment files, can be several times slower
# than cluster.storage_gb_s, and even a small checkpoint needs its processes started; a hung
# filesystem or worker still ends.
TIMEOUT_FACTOR = 4
MIN_TIMEOUT_S = 600


class ZeroSetup(Protocol):
    """The deepspeed section, or a setup the planner tries."""

    @property
    def stage(self) -> int: ...
    @property
    def offload_optimizer(self) -> bool: ...
    @property
    def offload_params(self) -> bool: ...


def converts(zero: ZeroSetup) -> bool:
    """Whether checkpoints of this ZeRO setup resume on another world size through the universal
    form: only partitioned optimizer state needs it. ZeRO-0's ranks each hold it whole, which any
    world size loads as it is; ZeRO-Offload's resume only on the world size that saved them."""
    return zero.stage > 0 and not (zero.offload_optimizer or zero.offload_params)


@dataclass(frozen=True)
class CheckpointSizes:
    """What the converter's memory and time depend on (bytes): read from a checkpoint's files
    (checkpoint_sizes), or counted for a model (model_sizes)."""

    # Optimizer-state files: one per rank that saved the checkpoint.
    files: int
    # All of them (fp32 master and Adam m, v: 12 bytes a parameter), and the largest one.
    optimizer: float
    shard: float
    # The largest model-states file: ZeRO 0-2's holds the whole module.
    module: float
    # Elements of the largest parameter.
    largest_param: int


def checkpoint_sizes(path: Path) -> CheckpointSizes:
    """A checkpoint's sizes from its files: their sizes on disk, and the parameters' shapes from the
    first model-states file's pickle (memory-mapped, weights-only: no tensor is read)."""
    optimizer = [p.stat().st_size for p in path.glob("*optim_states.pt")]
    # The ranks' module files; a mixture of experts' expert-parallel layers also save each expert
    # apart (layer_<l>_expert_<e>_mp_rank_<r>_model_states.pt), without the parameter shapes.
    models = sorted(p for p in path.glob("*model_states.pt") if not p.name.startswith("layer_"))
    if not optimizer or not models:
        raise ConfigError(
            f"{path} has no DeepSpeed optimizer or model states (*optim_states.pt, *model_states.pt); "
            "expected a ZeRO checkpoint to convert to the universal form."
        )
    try:
        with weights_only_loads():
            shapes = torch.load(models[0], map_location="cpu", mmap=True, weights_only=True)["param_shapes"]
    except (OSError, RuntimeError, KeyError, pickle.UnpicklingError) as err:
        raise ConfigError(f"cannot read the parameter shapes in {models[0]}: {err}") from None
    largest = max(math.prod(shape) for group in shapes for shape in group.values())
    module = max(p.stat().st_size for p in models)
    return CheckpointSizes(len(optimizer), float(sum(optimizer)), float(max(optimizer)), float(module), int(largest))


def model_sizes(params: int, largest_param: int, world_size: int, stage: int, element_bytes: int) -> CheckpointSizes:
    """The sizes of the checkpoint a model of `params` parameters has when `world_size` ranks save
    it under ZeRO `stage` with `element_bytes`-byte weights: what the plan counts without one."""
    optimizer = 12.0 * params
    module = float(element_bytes * params) if stage < 3 else 0.0
    return CheckpointSizes(world_size, optimizer, optimizer / world_size, module, largest_param)


def conversion_peak(sizes: CheckpointSizes, extract_workers: int, merge_workers: int) -> float:
    """Peak host memory (bytes) of ds_to_universal with these workers: the highest of its phases
    in the module's docstring. One worker runs in the main process (DeepSpeed makes no pool for one)."""
    process = PROCESS_GIB * GIB
    parameter = 4.0 * sizes.largest_param  # one fp32 copy
    loaded_shard = sizes.shard * 4 / 3  # with one of its three states copied

    def processes(workers: int) -> int:
        return 1 if workers == 1 else 1 + workers

    extract = processes(extract_workers) * process + extract_workers * (loaded_shard + parameter)
    merge = processes(merge_workers) * process + merge_workers * 4 * parameter
    main = process + sizes.module + loaded_shard + parameter
    return max(extract, merge, main)


@dataclass(frozen=True)
class ConversionPlan:
    """How a checkpoint is converted: its sizes, the workers, and the host memory they may hold."""

    sizes: CheckpointSizes
    extract_workers: int
    merge_workers: int
    # Bytes the conversion may hold on its node; None: unknown (cluster.host_memory_gb unset).
    budget: Optional[float]
    # GiB/s each of its processes reads or writes at (cluster.storage_gb_s).
    storage_gib_s: float

    @property
    def peak(self) -> float:
        return conversion_peak(self.sizes, self.extract_workers, self.merge_workers)

    @property
    def fits(self) -> Optional[bool]:
        return None if self.budget is None else self.peak <= self.budget

    @property
    def seconds(self) -> float:
        """Estimated: extracting reads every optimizer-state file and writes it again as fragments,
        merging reads those and writes the merged parameters (each phase spread over its workers);
        the main process reads the module file twice and copies it, and reads rank 0's
        optimizer-state file twice; every process at storage_gib_s."""
        s = self.sizes
        moved = 2 * s.optimizer / self.extract_workers + 2 * s.optimizer / self.merge_workers + 4 * s.module + 2 * s.shard
        return moved / (self.storage_gib_s * GIB)

    def timeout_s(self, configured: Optional[int]) -> float:
        """checkpoint.universal_timeout_s, or by default TIMEOUT_FACTOR x the estimate, at least MIN_TIMEOUT_S."""
        return float(configured) if configured is not None else max(float(MIN_TIMEOUT_S), TIMEOUT_FACTOR * self.seconds)

    def describe(self) -> str:
        return (
            f"peak host memory {self.peak / GIB:.1f} GiB with {self.extract_workers} extract + "
            f"{self.merge_workers} merge workers, about {_minutes(self.seconds)}"
        )


def plan_conversion(sizes: CheckpointSizes, budget: Optional[float], storage_gib_s: float) -> ConversionPlan:
    """The most workers, up to DeepSpeed's defaults (and no more extracting than there are files),
    whose peak fits `budget` bytes; one of each where the budget is unknown, or where not even
    that fits (the plan's `fits` then says so)."""

    def most(limit: int, peak_with: Callable[[int], float]) -> int:
        fitting = [w for w in range(1, limit + 1) if budget is not None and peak_with(w) <= budget]
        return max(fitting, default=1)

    extract = most(min(MAX_EXTRACT_WORKERS, sizes.files), lambda w: conversion_peak(sizes, w, 1))
    merge = most(MAX_MERGE_WORKERS, lambda w: conversion_peak(sizes, 1, w))
    return ConversionPlan(sizes, extract, merge, budget, storage_gib_s)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def convert(path: Path, plan: ConversionPlan, timeout_s: Optional[int]) -> Path:
    """path/universal, converted now with the plan's workers (the launcher's side, before any rank
    starts), or as it is where an earlier conversion finished. ConfigError when the converter
    fails or takes longer than its time limit (checkpoint.universal_timeout_s); whether the plan
    fits the node's host memory is the caller's to check first."""
    target = path / UNIVERSAL
    if target.is_dir():
        log.info("%s is already converted to DeepSpeed's universal checkpoint", path)
        return target
    limit = plan.timeout_s(timeout_s)
    scratch = path / f"{UNIVERSAL}.tmp"
    shutil.rmtree(scratch, ignore_errors=True)  # left by a conversion that was cut short
    log.info(
        "converting %s to DeepSpeed's universal checkpoint before the ranks start (once: it is kept in %s): %s; time limit %s",
        path,
        target,
        plan.describe(),
        _minutes(limit),
    )
    started = time.monotonic()
    # A process of its own, in a session of its own: a time-out or an interrupt ends its workers too.
    converter = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "zeroforge.trainer.universal",
            "--input_folder",
            str(path),
            "--output_folder",
            str(scratch),
            "--num_extract_workers",
            str(plan.extract_workers),
            "--num_merge_workers",
            str(plan.merge_workers),
            # Our checkpoints carry no tensor-parallel layout, which is all the converter looks for there.
            "--inject_missing_state",
        ],
        start_new_session=True,
    )
    code: Optional[int] = None
    try:
        code = converter.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if converter.poll() is None:
            os.killpg(converter.pid, signal.SIGKILL)
            converter.wait()
    if code != 0:
        shutil.rmtree(scratch, ignore_errors=True)  # its fragments alone are as large as the optimizer state
        what = f"took longer than its time limit of {limit:.0f} s" if code is None else f"failed (ds_to_universal exited with code {code})"
        raise ConfigError(
            f"cannot resume from {path} on another world size: converting it to DeepSpeed's universal checkpoint {what}; "
            f"its output is above. Planned: {plan.describe()}. A slow filesystem needs a longer "
            "checkpoint.universal_timeout_s (null: 4x the estimate, at least 10 min)."
        )
    (path / "latest_universal").unlink(missing_ok=True)  # the converter's own pointer, beside its output
    scratch.rename(target)
    log.info("converted %s in %s", target, _minutes(time.monotonic() - started))
    return target


def universal_checkpoint(path: Path, dist: DistInfo) -> Path:
    """path/universal, which the launcher converted before the ranks started; every rank must call
    it. Ranks never convert (the others would wait in a collective for as long as that takes):
    where it is missing, every rank stops with the command that converts it."""
    target = path / UNIVERSAL
    if not from_rank_zero(target.is_dir() if dist.is_main else None, dist):
        raise ConfigError(
            f"cannot resume from {path} on another world size: it has not been converted to DeepSpeed's universal "
            f"checkpoint ({target}), which the ranks load and never make themselves. `zeroforge launch` converts it "
            "before the ranks start; for ranks started by `zeroforge train`, torchrun or srun directly, run `zeroforge universal` with "
            "this run's overrides first."
        )
    return target


if __name__ == "__main__":
    # DeepSpeed's converter with its arguments, every torch.load in it (and in the worker
    # processes it forks) weights-only.
    with weights_only_loads():
        runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__", alter_sys=True)
