"""Process-group set-up: torchrun's environment, or a single process when there is none."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional, TypeVar, cast

import torch
import torch.distributed as dist

T = TypeVar("T")


class StartupAborted(RuntimeError):
    """This rank stops because rank 0 failed during start-up; rank 0 printed why."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistInfo:
    """Who this process is, read from the environment before any process group exists."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    return DistInfo(0, 1, 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str, timeout_s: Optional[float] = None) -> DistInfo:
    """Join (or, alone, create) the process group: nccl on GPUs, gloo on the CPU. timeout_s: how
    long a collective may wait before torch fails it (None: DeepSpeed's default)."""
    import deepspeed

    info = dist_env()
    os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        # Only reachable alone: torchrun always sets MASTER_PORT alongside RANK and WORLD_SIZE.
        os.environ["MASTER_PORT"] = str(free_port())
    if device == "cuda":
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        extra = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", verbose=False, **extra)
    return info


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    value = value.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's (picklable) value, in rank order, on every rank."""
    if info.world_size == 1:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def from_rank_zero(obj: Any, info: DistInfo) -> Any:
    """Rank 0's value on every rank, for decisions every rank must take the same way."""
    if info.world_size == 1:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_zero_first(info: DistInfo, fn: Callable[[], T]) -> T:
    """Run fn on rank 0, then on the others (which then find its cached result).

    Ranks agree on whether rank 0 succeeded, so a failure there never leaves the others waiting
    at a barrier until the collective timeout.
    """
    failure: BaseException | None = None
    result = None
    if info.is_main:
        try:
            result = fn()
        except BaseException as err:  # re-raised below, after the other ranks are told
            failure = err
    ok = from_rank_zero(failure is None, info)
    if failure is not None:
        raise failure
    if not ok:
        raise StartupAborted(f"rank {info.rank} stops: rank 0 failed during start-up (its message says why).")
    return cast(T, result) if info.is_main else fn()


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
