"""What every launch does before any rank starts, so that mistakes surface before GPUs are held."""
from __future__ import annotations

from omegaconf import DictConfig

from zeroforge.data.build import open_data
from zeroforge.trainer.model import resolve_vocab_size
from zeroforge.trainer.rundir import check_run_dir
from zeroforge.trainer.validate import Plan, validate


def preflight(cfg: DictConfig, world_size: int) -> Plan:
    """Validate, check the run directory, and prepare the data once (ranks never race to build it),
    or, when streaming, check that its tokenizer loads."""
    plan = validate(cfg, world_size)
    check_run_dir(cfg)
    manifest = open_data(cfg.data).manifest
    resolve_vocab_size(cfg.model, manifest["vocab_size"])
    return plan
