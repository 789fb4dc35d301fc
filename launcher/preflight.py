"""What every launch does before any rank starts, so that mistakes surface before GPUs are held."""

from __future__ import annotations

from omegaconf import DictConfig

from zeroforge.data.build import open_data
from zeroforge.trainer.checkpoint import check_resumable, newest_checkpoint
from zeroforge.trainer.model import check_init_from, resolve_vocab_size
from zeroforge.trainer.rundir import check_run_dir
from zeroforge.trainer.topology import Topology


def preflight(cfg: DictConfig, topology: Topology) -> None:
    """For a validated config: check the run directory, prepare the data once (ranks never race
    to build it), or, when streaming, check that its tokenizer loads; then check_continuation."""
    check_run_dir(cfg.run, cfg.checkpoint)
    check_continuation(cfg, open_data(cfg.data).manifest, topology)


def check_continuation(cfg: DictConfig, manifest: dict, topology: Topology) -> None:
    """What the run continues from fits it: the vocabulary, model.init_from's shape and tokenizer,
    and the checkpoint a resume would continue (model, tokenizer, data, seq_len, seed), so that a
    mismatch is refused here rather than in every rank."""
    vocab_size = resolve_vocab_size(cfg.model, manifest["vocab_size"])
    if cfg.model.init_from:
        check_init_from(cfg.model, vocab_size, manifest["tokenizer_hash"])
    resume = newest_checkpoint(cfg.checkpoint.dir, cfg.checkpoint.resume)
    if resume is not None:
        check_resumable(resume, cfg, manifest, topology.world_size)
