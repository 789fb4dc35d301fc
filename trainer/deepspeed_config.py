"""DeepSpeed's config, generated from the Hydra config: batch sizes and everything else live there."""

from __future__ import annotations

from typing import Any, Optional

from zeroforge.data.config import plain
from zeroforge.trainer.config import DeepSpeedConfig, OptimConfig
from zeroforge.trainer.topology import Topology


def zero_optimization(ds: DeepSpeedConfig, device: str) -> dict[str, Any]:
    """DeepSpeed's zero_optimization section: the stage, offload, then deepspeed.zero_extra verbatim."""
    zero: dict[str, Any] = {"stage": ds.stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device == "cuda"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device == "cuda"}
    zero.update(plain(ds.zero_extra))
    return zero


def deepspeed_config(
    *,
    optim: OptimConfig,
    deepspeed: DeepSpeedConfig,
    topology: Topology,
    load_universal: bool = False,
    expert_parallel: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The batch split comes from the topology; load_universal: the engine will load a universal
    checkpoint (a resume on another world size); expert_parallel: AutoEP's section (trainer/moe.py)."""
    ds = deepspeed
    zero = zero_optimization(ds, topology.device)
    config = {
        "train_batch_size": topology.global_batch_size,
        "train_micro_batch_size_per_gpu": topology.micro_batch_size,
        "gradient_accumulation_steps": topology.grad_accum,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": topology.bf16},
        "checkpoint": {"load_universal": load_universal},
        # zeroforge logs its own metrics; DeepSpeed's periodic prints would duplicate them.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # The optimizer is zeroforge's own AdamW (trainer/faults.py), which can skip a bad step.
        "zero_allow_untested_optimizer": True,
    }
    if topology.sequence > 1:
        # Where DeepSpeed reads this config without the engine's groups (zero.Init), this is
        # what divides the world into data-parallel ranks for its batch arithmetic.
        config["sequence_parallel_size"] = topology.sequence
    if expert_parallel is not None:
        config["expert_parallel"] = expert_parallel
    if ds.offload_optimizer:
        # ZeRO-Offload needs DeepSpeed's own CPU Adam, which DeepSpeed builds from this section.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay},
        }
    return config
