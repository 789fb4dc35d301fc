"""The pre-flight plan: whether a job fits on its GPUs and how long it takes, before it is queued.

`zeroforge plan [overrides]` prints it; every launch path calls `check_fits(planner)`,
which refuses a job that cannot fit (unless `launcher.force=true`) and names changes that would.

The plan itself is counted in launcher/estimate.py (parts in launcher/memory.py), the changes
that would make a job fit in launcher/fixes.py; this module reports them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from zeroforge.launcher.estimate import Conversion, MemoryPlan, Planner
from zeroforge.launcher.fixes import MAX_NODE_DOUBLINGS, fixes
from zeroforge.launcher.memory import CUDA_CONTEXT_GIB, FRAGMENTATION, GIB, HOST_FRAGMENTATION, HOST_SYSTEM_GIB
from zeroforge.trainer.config import ClusterConfig, ConfigError
from zeroforge.trainer.entry import entry_point
from zeroforge.trainer.universal import PROCESS_GIB, ConversionPlan
from zeroforge.trainer.validate import job_topology

log = logging.getLogger("zeroforge")


def _gib(x: float) -> str:
    return f"{x / GIB:.1f} GiB"


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "unknown (set cluster.peak_tflops)"
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    hours = seconds / 3600
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def _where(plan: MemoryPlan) -> str:
    s = plan.setup
    offload = " + offload optimizer" if s.offload_optimizer else ""
    offload += " + offload params" if s.offload_params else ""
    ckpt = "on" if s.activation_checkpointing else "off"
    sequence = f", sequence parallel {s.sequence}" if s.sequence > 1 else ""
    return (
        f"ZeRO-{s.stage}{offload}, {plan.precision}, {s.nodes} node(s) x {plan.world_size // s.nodes} GPUs{sequence}, "
        f"micro batch {s.micro_batch} x seq_len {plan.seq_len}, activation checkpointing {ckpt}, loss {s.loss}"
    )


def _host_breakdown(plan: MemoryPlan) -> str:
    h = plan.host
    return (
        f"per rank {_gib(h.process)} of its own and {_gib(h.resident)} held while training; on top of that, "
        f"start-up {_gib(h.startup)}, resume {_gib(h.resume)}, save {_gib(h.save)}"
        + (f" (+{_gib(h.save_rank0)} on rank 0)" if h.save_rank0 else "")
        + f", export {_gib(h.export)} (rank 0); x {h.ranks_per_node} ranks a node, "
        f"+{HOST_FRAGMENTATION:.0%} and {HOST_SYSTEM_GIB:.0f} GiB for the system"
    )


def conversion_refusal(path: Path, plan: ConversionPlan, cluster: ClusterConfig) -> str:
    """Why converting the checkpoint at `path` to DeepSpeed's universal form cannot fit a node."""
    s = plan.sizes
    return (
        f"cannot resume from {path} on another world size: converting it to DeepSpeed's universal checkpoint "
        f"(before the ranks start, on one node) needs {_gib(plan.peak)} of host memory even with 1 extract and 1 merge "
        f"worker, but cluster.host_memory_gb={cluster.host_memory_gb} ({cluster.name}) leaves it {_gib(plan.budget or 0.0)} "
        f"after {HOST_SYSTEM_GIB:.0f} GiB and {HOST_FRAGMENTATION:.0%} for the system: one rank's optimizer state (the "
        f"largest file) {_gib(s.shard)} (loaded with one of its three states copied: {_gib(s.shard * 4 / 3)}), the module file "
        f"{_gib(s.module)}, four fp32 copies of the largest parameter {_gib(16 * s.largest_param)}, {PROCESS_GIB} GiB a "
        f"process. Resume on the world size that saved it ({s.files} ranks), or convert it on a node with more host "
        "memory: `zeroforge universal` with this run's overrides and that node's cluster.host_memory_gb."
    )


def _conversion_line(conversion: Optional[Conversion], world_size: int) -> str:
    if conversion is None:
        return "resume on another world size: its checkpoints load as they are (ZeRO-0) or only on this world size (ZeRO-Offload)"
    p = conversion.plan
    figures = f"{p.describe()} (time limit {_duration(conversion.timeout_s)})"
    if p.fits is None:
        figures += "; host memory unknown: 1 worker each"
    if conversion.checkpoint is None:
        return (
            f"resume on another world size: this job's checkpoints ({world_size} ranks) are converted to DeepSpeed's "
            f"universal checkpoint before the ranks start, {figures}"
        )
    verdict = "" if p.fits is None else f", {'fits in' if p.fits else 'DOES NOT FIT in'} {_gib(p.budget or 0.0)}"
    return (
        f"resume on another world size: {conversion.checkpoint} (saved by {conversion.saved_by} ranks"
        f"{f' with parallel.expert={conversion.saved_expert}' if conversion.saved_expert > 1 else ''}, this job has "
        f"{world_size}) is converted to DeepSpeed's universal checkpoint before the ranks start, {figures}{verdict}"
    )


def refusal(planner: Planner, plan: MemoryPlan) -> str:
    """Why the job does not fit, with the numbers and the changes that would make it fit."""
    found = fixes(planner, plan)
    cluster = planner.cluster
    lines = []
    if plan.conversion is not None and plan.conversion.checkpoint is not None and plan.conversion_fits is False:
        lines.append(conversion_refusal(plan.conversion.checkpoint, plan.conversion.plan, cluster))
    if plan.gpu_fits is False:
        lines.append(
            f"{plan.model.name} needs {_gib(plan.total)} per GPU but cluster.gpu_memory_gb={cluster.gpu_memory_gb} "
            f"({cluster.name}), at {_where(plan)}: weights {_gib(plan.weights)}, gradients "
            f"{_gib(plan.gradients)}, optimizer {_gib(plan.optimizer)}, buffers {_gib(plan.buffers)}, "
            f"activations {_gib(plan.activations)}, margin {_gib(plan.margin)}."
        )
    if plan.host_fits is False:
        lines.append(
            f"{plan.model.name} needs {_gib(plan.host.per_node)} of host memory per node (at {plan.host.highest}) but "
            f"cluster.host_memory_gb={cluster.host_memory_gb} ({cluster.name}), at {_where(plan)}: "
            f"{_host_breakdown(plan)}."
        )
    if found:
        lines.append("Changes that fit, cheapest first:")
        lines += [f"  {overrides}  ->  {_gib(p.total)} per GPU, {_gib(p.host.per_node)} host per node" for overrides, p in found]
    elif plan.gpu_fits is False or plan.host_fits is False:
        lines.append(
            f"No change of ZeRO stage, checkpointing, micro batch, offload, loss, parallel.sequence or (on Slurm) up to "
            f"{2**MAX_NODE_DOUBLINGS}x the nodes fits."
        )
    lines.append("Or launcher.force=true to launch anyway (zeroforge plan prints the whole plan)")
    return "\n".join(lines)


def check_fits(planner: Planner) -> MemoryPlan:
    """What every launch path calls before it prepares data or submits: refuse a job that cannot
    fit, unless forced. The topology comes from validate(), so a plan is only made of a valid config."""
    plan = planner.estimate()
    problem = plan.hang_timeout_problem()
    if problem is not None:
        raise ConfigError(problem + ".")
    if plan.fits is False:
        if not planner.launcher.force:
            raise ConfigError(refusal(planner, plan))
        log.warning("launcher.force=true: launching although %s", refusal(planner, plan).splitlines()[0])
    else:
        log.info(
            "plan: %s per GPU (%s), %s host memory per node (%s), %s per step, %s to %.3g tokens at %.0f%% MFU",
            _gib(plan.total),
            "fits" if plan.gpu_fits else "GPU memory unknown",
            _gib(plan.host.per_node),
            "fits" if plan.host_fits else "host memory unknown",
            _duration(plan.step_time_s),
            _duration(plan.total_time_s),
            plan.tokens_per_step * plan.steps,
            100 * plan.assumed_mfu,
        )
    if plan.conversion is not None and plan.conversion.checkpoint is not None:
        log.info("plan: %s", _conversion_line(plan.conversion, plan.world_size))
    log.info("plan: a rank that completes no step in %s is hung (cluster.hang_timeout_s)", _duration(plan.hang_timeout_s))
    return plan


def _stage_table(planner: Planner, plan: MemoryPlan) -> list[str]:
    rows = [
        "| ZeRO | weights | grads | optimizer | buffers | activations (ckpt off / on) | total (ckpt off / on) | fits (off / on) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for stage, offload in [(0, False), (1, False), (2, False), (3, False), (3, True)]:
        off, on = (
            planner.plan(
                replace(plan.setup, stage=stage, offload_optimizer=offload, offload_params=offload, activation_checkpointing=ckpt),
            )
            for ckpt in (False, True)
        )
        verdict = " / ".join("?" if p.fits is None else "yes" if p.fits else "no" for p in (off, on))
        rows.append(
            f"| {stage}{' + offload (zero3-offload)' if offload else ''} | {_gib(off.weights)} | {_gib(off.gradients)} | "
            f"{_gib(off.optimizer)} | {_gib(off.buffers)} | {_gib(off.activations)} / {_gib(on.activations)} | "
            f"{_gib(off.total)} / {_gib(on.total)} | {verdict} |"
        )
    return rows


def _host_table(plan: MemoryPlan) -> list[str]:
    h = plan.host
    phases = h.phases()
    explained = {
        "start-up": ("building the model and the engine", max(h.startup, h.resident)),
        "resume": ("DeepSpeed reading the rank's checkpoint into host memory", h.resident + h.resume),
        "save": ("async copy of the checkpoint" if plan.setup.async_save else "torch.save staging one tensor", h.resident + h.save),
        "export": ("rank 0 writing one gathered parameter at a time (rank 0)", h.resident + h.export),
    }
    rows = [
        f"| host memory ({h.ranks_per_node} ranks a node) | per rank above its own {_gib(h.process)} | per node |",
        "| --- | ---: | ---: |",
    ]
    for phase, (what, per_rank) in explained.items():
        rows.append(f"| {phase}: {what} | {_gib(per_rank)} | {_gib(phases[phase])} |")
    return rows


def _verdict(fits: Optional[bool], memory: Optional[float], unknown: str, per: str = "") -> str:
    if fits is None or memory is None:
        return unknown
    return f"{'fits in' if fits else 'DOES NOT FIT in'} {_gib(memory)}{per}"


def _longest_line(planner: Planner) -> list[str]:
    if planner.cluster.gpu_memory_gb is None:
        return []
    longest = planner.longest_seq_len()
    most = planner.model.max_position_embeddings
    if longest is None:
        return [f"longest data.seq_len: none up to model.max_position_embeddings={most:,} fits this setup"]
    return [f"longest data.seq_len that fits this setup: {longest:,} (model.max_position_embeddings={most:,})"]


def _experts_line(plan: MemoryPlan) -> list[str]:
    m, expert = plan.model, plan.topology.expert
    if not m.experts:
        return []
    return [
        f"mixture of experts: {m.experts} experts per MoE layer, {m.experts // expert} on each rank (parallel.expert={expert}); "
        f"{m.active_params / 1e9:.3f}B of the parameters active per token (the FLOPs and MFU count these), "
        f"{m.expert_params / 1e9:.3f}B in the routed experts (the memory counts {1 / expert:.3g} of these per rank)"
    ]


def format_plan(planner: Planner, plan: MemoryPlan) -> str:
    m = plan.model
    verdict = _verdict(plan.gpu_fits, plan.gpu_memory, "GPU memory unknown (set cluster.gpu_memory_gb): not checked")
    host_verdict = _verdict(plan.host_fits, plan.host_memory, "host memory unknown (set cluster.host_memory_gb): not checked", " per node")
    inference = plan.inference_weights + plan.kv_cache
    lines = [
        f"{m.name}: {m.params / 1e9:.3f}B parameters (vocabulary {m.vocab_size}), "
        f"{m.flops_per_token / 1e9:.2f} GFLOPs per token (6N + attention at seq_len {plan.seq_len})",
        *_experts_line(plan),
        f"setup: {_where(plan)}",
        "",
        "| per GPU | |",
        "| --- | ---: |",
        f"| weights | {_gib(plan.weights)} |",
        f"| gradients | {_gib(plan.gradients)} |",
        f"| optimizer states (fp32 master, Adam m, v, fp32 grads) | {_gib(plan.optimizer)} |",
        f"| buffers (DeepSpeed's buckets, AdamW's step temporary) | {_gib(plan.buffers)} |",
        f"| activations (checkpointing {'on' if plan.setup.activation_checkpointing else 'off'}; "
        f"{'off' if plan.setup.activation_checkpointing else 'on'}: {_gib(plan.activations_other)}) | {_gib(plan.activations)} |",
        f"| margin ({CUDA_CONTEXT_GIB:.0f} GiB CUDA context + {FRAGMENTATION:.0%} fragmentation) | {_gib(plan.margin)} |",
        f"| total | {_gib(plan.total)} |",
        "",
        f"verdict: {verdict}",
        *_longest_line(planner),
        "",
        *_host_table(plan),
        "",
        f"host verdict: {host_verdict}",
        _conversion_line(plan.conversion, plan.world_size),
        "",
    ]
    lines += [
        f"time: {_duration(plan.step_time_s)} per step of {plan.tokens_per_step:,} tokens, "
        f"{_duration(plan.total_time_s)} for {plan.steps:,} steps ({plan.tokens_per_step * plan.steps:.3g} tokens) "
        f"at {plan.assumed_mfu:.0%} MFU of {plan.peak_tflops or '?'} TFLOP/s per GPU (launcher.assumed_mfu)",
        f"hang timeout: {_duration(plan.hang_timeout_s)} without a completed step ends the job as hung "
        f"({'cluster.hang_timeout_s' if plan.configured_hang_timeout_s is not None else 'derived'}; a checkpoint save "
        f"{_duration(plan.save_time_s)} at {plan.storage_gb_s} GiB/s per rank)",
        f"inference: weights {_gib(plan.inference_weights)} + KV cache {_gib(plan.kv_cache)} "
        f"(batch {plan.inference_batch} x context {plan.inference_context}) = {_gib(inference)}"
        + ("" if plan.gpu_memory is None else f", {math.ceil(inference / (plan.gpu_memory - CUDA_CONTEXT_GIB * GIB))} GPU(s)"),
        "",
        *_stage_table(planner, plan),
    ]
    if plan.fits is False:
        lines += ["", refusal(planner, plan)]
    return "\n".join(lines)


def print_plan(cfg: DictConfig) -> MemoryPlan:
    planner = Planner.of(cfg, job_topology(cfg))
    plan = planner.estimate()
    print(format_plan(planner, plan), flush=True)
    return plan


@entry_point
def main(cfg: DictConfig) -> None:
    print_plan(cfg)


if __name__ == "__main__":
    main()
