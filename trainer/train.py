"""train(cfg): init -> build -> loop -> save and export, in that order, top to bottom.

Entry points: `python -m trainer.train [overrides]`, `torchrun --nproc_per_node N -m trainer.train`.
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from data.loader import BatchLoader, validation_batches
from data.prepare import prepare
from data.shards import TokenStore
from data.tokenizer import load_tokenizer
from launcher.cli import run_entry_point
from launcher.config import CONF_DIR
from launcher.rundir import check_fresh_run_dir, write_run_dir
from launcher.validate import validate
from trainer import distributed
from trainer.checkpoint import export_hf, save_checkpoint
from trainer.engine import build_engine, train_step, validation_loss
from trainer.log import setup_logging
from trainer.metrics import MetricsLogger
from trainer.model import build_model, flops_per_token, resolve_vocab_size

log = logging.getLogger("zeroforge")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: DictConfig) -> dict:
    """Train, checkpoint and export; returns the last logged metrics record (rank 0) or {}."""
    env = distributed.dist_env()
    setup_logging(env.rank, cfg.logging.level)
    plan = validate(cfg, env.world_size)  # before any process group, data or model exists
    check_fresh_run_dir(cfg)
    dist = distributed.init_distributed(plan.device)
    device = f"cuda:{dist.local_rank}" if plan.device == "cuda" else "cpu"

    prepared = distributed.rank_zero_first(dist, lambda: prepare(cfg.data))
    tokenizer = load_tokenizer(prepared / "tokenizer")
    vocab_size = resolve_vocab_size(cfg.model, len(tokenizer))
    if dist.is_main:
        write_run_dir(cfg)

    seed_everything(cfg.seed)
    model = build_model(cfg.model, vocab_size, tokenizer.eos_token_id)
    num_params = sum(p.numel() for p in model.parameters())
    fpt = flops_per_token(model.config, num_params, cfg.data.seq_len)
    engine = build_engine(model, cfg, plan)
    log.info(
        "%s: %.2fM parameters | world size %d | ZeRO-%d | %s | micro batch %d x grad accum %d x dp %d = %d",
        cfg.model.name, num_params / 1e6, dist.world_size, cfg.deepspeed.stage, plan.precision,
        cfg.train.micro_batch_size, plan.grad_accum, plan.dp_size, cfg.train.global_batch_size,
    )

    loader = BatchLoader(
        TokenStore(prepared, "train"), cfg.data.seq_len, cfg.seed, cfg.train.global_batch_size,
        cfg.train.micro_batch_size, dp_rank=dist.rank, dp_size=plan.dp_size,
    )
    val_batches = validation_batches(
        TokenStore(prepared, "validation"), cfg.data.seq_len, cfg.eval.batch_size, cfg.eval.batches
    )
    metrics = MetricsLogger(cfg, dist, plan, fpt)

    def checkpoint(step: int) -> None:
        client_state = {
            "step": step,
            "data": loader.state_dict(),
            "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        }
        save_checkpoint(engine, cfg.checkpoint.dir, step, client_state)

    last: dict = {}
    for step in range(1, cfg.train.steps + 1):
        loss, grad_norm, lr = train_step(engine, loader.next_batch(), device, metrics.logs_at(step))
        last = metrics.step(step, loss, grad_norm, lr) or last
        if cfg.eval.every and step % cfg.eval.every == 0:
            started = time.perf_counter()
            val_loss = validation_loss(engine, val_batches, device)
            metrics.write({"step": step, "val_loss": val_loss, "val_ppl": float(np.exp(val_loss))})
            log.info("step %d | validation loss %.4f | perplexity %.2f", step, val_loss, np.exp(val_loss))
            metrics.exclude_time(time.perf_counter() - started)
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.train.steps:
            started = time.perf_counter()
            checkpoint(step)
            metrics.exclude_time(time.perf_counter() - started)

    checkpoint(cfg.train.steps)
    export_hf(
        engine, tokenizer, cfg.checkpoint.export_dir, dist,
        {"step": cfg.train.steps, "tokens": metrics.tokens, "prepared_data": str(prepared.resolve())},
    )
    metrics.close()
    distributed.close()
    return last


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_entry_point(lambda: train(cfg))


if __name__ == "__main__":
    main()
