"""What every launch does before any rank starts, so that mistakes surface before GPUs are held."""
from __future__ import annotations

from omegaconf import DictConfig

from data.prepare import prepare
from data.shards import load_manifest
from launcher.rundir import check_run_dir
from launcher.validate import Plan, validate
from trainer.model import resolve_vocab_size


def preflight(cfg: DictConfig, world_size: int) -> Plan:
    """Validate, check the run directory, and prepare the data once (ranks never race to build it)."""
    plan = validate(cfg, world_size)
    check_run_dir(cfg)
    manifest = load_manifest(prepare(cfg.data))
    resolve_vocab_size(cfg.model, manifest["vocab_size"])
    return plan
