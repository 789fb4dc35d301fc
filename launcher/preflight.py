"""What every launch does before any rank starts, so that mistakes surface before GPUs are held."""
from __future__ import annotations

from omegaconf import DictConfig

from zeroforge.data.build import open_data
from zeroforge.trainer.checkpoint import check_resumable, newest_checkpoint
from zeroforge.trainer.model import check_init_from, resolve_vocab_size
from zeroforge.trainer.rundir import check_run_dir
from zeroforge.trainer.validate import Plan, validate


def preflight(cfg: DictConfig, world_size: int) -> Plan:
    """Validate, check the run directory, prepare the data once (ranks never race to build it),
    or, when streaming, check that its tokenizer loads; check model.init_from's shape and
    tokenizer, and that the checkpoint a resume would continue from belongs to this run (model,
    tokenizer, data, seq_len, seed), so that a mismatch is refused here rather than in every rank."""
    plan = validate(cfg, world_size)
    check_run_dir(cfg)
    manifest = open_data(cfg.data).manifest
    vocab_size = resolve_vocab_size(cfg.model, manifest["vocab_size"])
    if cfg.model.init_from:
        check_init_from(cfg.model, vocab_size, manifest["tokenizer_hash"])
    resume = newest_checkpoint(cfg.checkpoint.dir, cfg.checkpoint.resume)
    if resume is not None:
        check_resumable(resume, cfg, manifest, world_size)
    return plan
