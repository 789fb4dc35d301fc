"""The fix search: the cheapest changes of ZeRO stage, checkpointing, micro batch, nodes, offload,
loss and construction that make a job fit, each recomputed as its own plan."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from typing import Iterator

from zeroforge.launcher.estimate import MemoryPlan, Planner
from zeroforge.launcher.memory import Setup
from zeroforge.trainer.config import Scheduler
from zeroforge.trainer.loss import LINEAR_HEAD_MODEL_TYPES

# What each change costs, roughly, to rank the fixes: the chunked loss costs nothing (the same
# loss, no slower), a ZeRO stage adds communication (per stage), checkpointing recomputes the
# forward (a third more compute), a halved micro batch runs smaller kernels, a doubling of the
# nodes doubles the GPUs held, offloading the optimizer puts its step on the CPU, and
# partitioned construction costs a little start-up time; each doubling of parallel.sequence
# adds Ulysses' all-to-all around every attention (and halves the data-parallel ranks). (A synchronous save is never a fix:
# the async save's host copy is what a resume reads anyway.)
_COST = {"loss": 0, "stage": 1, "checkpointing": 2, "halving": 1, "doubling": 4, "offload": 6, "host": 1, "sequence": 2}
MAX_NODE_DOUBLINGS = 6


def _candidates(planner: Planner, now: Setup) -> Iterator[tuple[tuple[int, int], Setup]]:
    glob = planner.train.global_batch_size
    # The local launcher runs one node; more nodes are a fix only on a cluster.
    doublings_allowed = MAX_NODE_DOUBLINGS if planner.cluster.scheduler == Scheduler.slurm else 0
    # The plain loss can become the chunked one where that is exact for the model type.
    losses = sorted({now.loss, "chunked"} if now.loss == "plain" and planner.model.model_type in LINEAR_HEAD_MODEL_TYPES else {now.loss})
    splits = planner.sequence_splits(now.nodes << doublings_allowed)
    for stage, ckpt, halvings, doublings, offload, loss, zero_init, sequence in itertools.product(
        range(now.stage, 4),
        sorted({now.activation_checkpointing, True}),
        range(0, int(math.log2(now.micro_batch)) + 1),
        range(0, doublings_allowed + 1),
        sorted({now.offload_optimizer, True}),
        losses,
        sorted({now.zero_init, True}),
        sorted({now.sequence, *(sp for sp in splits if sp > now.sequence)}),
    ):
        setup = replace(
            now,
            stage=stage,
            activation_checkpointing=ckpt,
            micro_batch=max(1, now.micro_batch >> halvings),
            nodes=now.nodes << doublings,
            offload_optimizer=offload and stage >= 1,
            loss=loss,
            zero_init=zero_init,
            sequence=sequence,
        )
        world = planner.topology_of(setup).world_size
        if offload and stage == 0 or world % sequence or glob % (setup.micro_batch * planner.topology_of(setup).dp_size):
            continue  # offload needs ZeRO; sequence groups must divide the world; the global batch must still divide
        cost = (
            _COST["stage"] * (stage - now.stage)
            + _COST["checkpointing"] * (ckpt != now.activation_checkpointing)
            + _COST["halving"] * halvings
            + _COST["doubling"] * doublings
            + _COST["offload"] * (offload != now.offload_optimizer)
            + _COST["loss"] * (loss != now.loss)
            + _COST["host"] * (zero_init != now.zero_init)
            + _COST["sequence"] * int(math.log2(sequence // now.sequence))
        )
        yield (cost, len(_changed(now, setup))), setup


def _overrides(now: Setup, fix: Setup) -> str:
    parts = []
    if fix.stage != now.stage:
        parts.append(f"deepspeed.stage={fix.stage}")
    if fix.activation_checkpointing != now.activation_checkpointing:
        parts.append("model.activation_checkpointing=true")
    if fix.micro_batch != now.micro_batch:
        parts.append(f"train.micro_batch_size={fix.micro_batch}")
    if fix.nodes != now.nodes:
        parts.append(f"cluster.nodes={fix.nodes}")
    if fix.offload_optimizer != now.offload_optimizer:
        parts.append("deepspeed.offload_optimizer=true")
    if fix.loss != now.loss:
        parts.append(f"train.loss={fix.loss}")
    if fix.zero_init != now.zero_init and fix.stage == 3:
        parts.append("deepspeed.zero_init=true")
    if fix.sequence != now.sequence:
        parts.append(f"parallel.sequence={fix.sequence}")
    return " ".join(parts)


def _changed(now: Setup, fix: Setup) -> set[str]:
    """Which knobs a fix turns (not by how much)."""
    return {override.split("=")[0] for override in _overrides(now, fix).split()}


def fixes(planner: Planner, plan: MemoryPlan, limit: int = 4) -> list[tuple[str, MemoryPlan]]:
    """The cheapest changes that make the job fit, each recomputed; none that turns a superset of
    the knobs of one already listed."""
    fitting = [(cost, setup) for cost, setup in _candidates(planner, plan.setup) if planner.plan(setup).fits]
    chosen: list[Setup] = []
    for _, setup in sorted(fitting, key=lambda item: item[0]):
        if any(_changed(plan.setup, earlier) <= _changed(plan.setup, setup) for earlier in chosen):
            continue
        chosen.append(setup)
        if len(chosen) == limit:
            break
    return [(_overrides(plan.setup, s), planner.plan(s)) for s in chosen]
