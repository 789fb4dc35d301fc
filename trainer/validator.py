"""Evaluation inside the training loop, every eval.every steps: the held-out loss and perplexity,
and greedy sample generations (the harness after training is trainer/evaluate.py)."""

from __future__ import annotations

import logging
from typing import cast

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from zeroforge.trainer.config import EvalConfig
from zeroforge.trainer.engine import validation_loss
from zeroforge.trainer.generate import decode
from zeroforge.trainer.metrics import MetricsLogger

log = logging.getLogger("zeroforge")


class Validator:
    """Every rank calls maybe_validate(step) at every step; on eval.every's cadence all of them
    compute the loss and decode (under ZeRO-3 each forward gathers from every rank), and rank 0's
    metrics write the results."""

    def __init__(
        self,
        cfg: EvalConfig,
        engine: torch.nn.Module,
        batches: list[torch.Tensor],
        tokenizer: PreTrainedTokenizerBase,
        metrics: MetricsLogger,
        device: str,
        synced_gpus: bool,
    ):
        self.cfg, self.engine, self.batches, self.tokenizer = cfg, engine, batches, tokenizer
        self.metrics, self.device, self.synced_gpus = metrics, device, synced_gpus

    def maybe_validate(self, step: int) -> None:
        if not (self.cfg.every and step % self.cfg.every == 0):
            return
        val_loss = validation_loss(self.engine, self.batches, self.device)
        self.metrics.write({"step": step, "val_loss": val_loss, "val_ppl": float(np.exp(val_loss))})
        log.info("step %d | validation loss %.4f | perplexity %.2f", step, val_loss, np.exp(val_loss))
        if self.cfg.sample_prompts:
            module = cast(PreTrainedModel, getattr(self.engine, "module", self.engine))  # the plain model inside the engine
            samples = decode(
                module, self.tokenizer, list(self.cfg.sample_prompts), self.cfg.sample_max_new_tokens, synced_gpus=self.synced_gpus
            )
            self.metrics.samples(step, [{"prompt": s.prompt, "text": s.text} for s in samples])
