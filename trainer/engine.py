"""Wrapping the plain model for training: activation checkpointing, compile, the DeepSpeed engine."""
from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.optim.lr_scheduler import LambdaLR

from zeroforge.data.boundaries import IGNORE_INDEX, DocumentBoundaries
from zeroforge.trainer.deepspeed_config import deepspeed_config
from zeroforge.trainer.faults import FaultGuard, SkippableAdamW
from zeroforge.trainer.partitioned import full_shape, zero3_startup
from zeroforge.trainer.schedule import lr_factor
from zeroforge.trainer.validate import Plan

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Only matrices decay; biases and norm scales (1-d) do not (by their full shape: a ZeRO-3
    partitioned parameter is flat)."""
    decay = [p for p in model.parameters() if p.requires_grad and len(full_shape(p)) >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and len(full_shape(p)) < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class _KnownOptimizer(logging.Filter):
    """DeepSpeed warns about every optimizer class not on its list; ours is torch's AdamW with a skip flag."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "untested optimizer" not in record.getMessage()


_KNOWN_OPTIMIZER = _KnownOptimizer()


def build_engine(model: torch.nn.Module, cfg: DictConfig, plan: Plan, load_universal: bool = False) -> DeepSpeedEngine:
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.addFilter(_KNOWN_OPTIMIZER)  # added once: the same filter object is not added twice

    if cfg.model.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "config"):
        model.config.use_cache = False
    factor = lr_factor(cfg.optim, cfg.train.steps)
    groups = param_groups(model, cfg.optim.weight_decay)
    optim = cfg.optim
    # With ZeRO-Offload DeepSpeed builds its CPU Adam from the generated config instead.
    optimizer = None if cfg.deepspeed.offload_optimizer else SkippableAdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    with zero3_startup() if cfg.deepspeed.stage == 3 else contextlib.nullcontext():
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=groups if optimizer is None else None,
            config=deepspeed_config(cfg, plan, load_universal),
            lr_scheduler=lambda optimizer: LambdaLR(optimizer, factor),
        )
    if cfg.model.compile:
        # Compiles in place, so parameter names (and checkpoints) carry no `_orig_mod.` prefix.
        engine.compile()
    return engine


def causal_lm_loss(
    model: torch.nn.Module, tokens: torch.Tensor, boundaries: Optional[DocumentBoundaries] = None
) -> torch.Tensor:
    """Mean next-token loss of [batch, seq_len + 1] windows: inputs tokens[:, :-1], targets tokens[:, 1:].

    With boundaries, positions restart per document and/or the pair after each EOS is left out.
    """
    if boundaries is None:
        logits = model(input_ids=tokens[:, :-1]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    inputs = tokens[:, :-1]
    logits = model(input_ids=inputs, position_ids=boundaries.position_ids(inputs)).logits
    return F.cross_entropy(logits.float().flatten(0, 1), boundaries.targets(tokens).flatten(), ignore_index=IGNORE_INDEX)


def _grad_norm(model: torch.nn.Module) -> Optional[torch.Tensor]:
    grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(grads).norm() if grads else None


def train_step(
    engine: DeepSpeedEngine, micro_batches: list[torch.Tensor], device: str, measure_grad_norm: bool,
    guard: FaultGuard, step: int, boundaries: Optional[DocumentBoundaries] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], float, bool]:
    """One optimizer step over this rank's micro-batches: (local mean loss, grad norm, lr used,
    whether the update was skipped; see trainer/faults.py).

    Loss and norm stay tensors so that a GPU is not synchronised on steps that log nothing.
    """
    engine.train()
    lr = engine.get_lr()[0]  # DeepSpeed advances the scheduler inside the last engine.step()
    total = torch.zeros((), device=device)
    norm = None
    skipped_before = engine.skipped_steps
    for i, batch in enumerate(micro_batches):
        loss = causal_lm_loss(engine, batch.to(device, non_blocking=True), boundaries)
        engine.backward(loss)
        total += loss.detach()
        last = i == len(micro_batches) - 1
        if last and (measure_grad_norm or guard.checks_grad_norm) and engine.zero_optimization_stage() == 0:
            # Without ZeRO, DeepSpeed clips but does not keep the norm; gradients are already
            # averaged across ranks here, so this is the same number ZeRO 1-3 report.
            norm = _grad_norm(engine.module)
        if last and guard.judges_before_update:
            guard.before_update(total / len(micro_batches), norm)
        engine.step()
    reported = engine.get_global_grad_norm()
    if reported is not None:
        norm = torch.as_tensor(reported)
    skipped = guard.after_update(step, skipped_by_deepspeed=engine.skipped_steps > skipped_before)
    return total / len(micro_batches), norm, lr, skipped


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: list[torch.Tensor], device: str) -> float:
    """Mean token loss over fixed held-out windows (every window has the same number of tokens)."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        loss = causal_lm_loss(model, batch.to(device))
        n = batch[:, 1:].numel()
        total += loss.item() * n
        count += n
    return total / count
