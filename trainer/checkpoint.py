"""Saving through DeepSpeed, and exporting plain HF weights (safetensors) with the tokenizer."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from transformers import PreTrainedTokenizerBase

from trainer.distributed import DistInfo, barrier

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

log = logging.getLogger("zeroforge")


def save_checkpoint(engine: DeepSpeedEngine, ckpt_dir: str | Path, step: int, client_state: dict[str, Any]) -> Path:
    """A DeepSpeed checkpoint tagged step_<N> (every rank writes its shard)."""
    tag = f"step_{step:07d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    log.info("saved checkpoint %s/%s", ckpt_dir, tag)
    return Path(ckpt_dir) / tag


def consolidated_state_dict(engine: DeepSpeedEngine, dist: DistInfo) -> Optional[dict[str, torch.Tensor]]:
    """The full, unwrapped model weights on rank 0 (None elsewhere); every rank must call it."""
    if engine.zero_optimization_stage() == 3:
        # Gathers one layer at a time into rank 0's CPU memory, never the whole model on one GPU.
        state = engine._zero3_consolidated_16bit_state_dict()
        return dict(state) if dist.is_main else None
    if not dist.is_main:
        return None
    return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}


def export_hf(
    engine: DeepSpeedEngine, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path, dist: DistInfo, meta: dict[str, Any]
) -> Path:
    """Write config, safetensors weights and tokenizer; the directory appears complete or not at all."""
    out = Path(out_dir)
    state = consolidated_state_dict(engine, dist)
    if dist.is_main:
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        engine.module.save_pretrained(str(tmp), state_dict=state)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "zeroforge.json").write_text(json.dumps(meta, indent=2))
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        log.info("exported HF weights and tokenizer to %s", out)
    barrier()
    return out
