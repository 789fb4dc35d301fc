"""What every launch does before any rank starts, so that mistakes surface before GPUs are held."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from zeroforge.data.build import open_data, prepared_manifest
from zeroforge.data.config import DataConfig
from zeroforge.launcher.memory import conversion_budget
from zeroforge.launcher.plan import conversion_refusal
from zeroforge.trainer.checkpoint import check_resumable, newest_checkpoint
from zeroforge.trainer.config import CheckpointConfig, ClusterConfig, ConfigError, DeepSpeedConfig, ModelConfig, RunSection
from zeroforge.trainer.model import check_init_from, resolve_vocab_size
from zeroforge.trainer.rundir import check_run_dir
from zeroforge.trainer.topology import Topology
from zeroforge.trainer.universal import checkpoint_sizes, convert, plan_conversion

log = logging.getLogger("zeroforge")


def preflight(
    topology: Topology,
    *,
    run: RunSection,
    checkpoint: CheckpointConfig,
    model: ModelConfig,
    data: DataConfig,
    deepspeed: DeepSpeedConfig,
    cluster: ClusterConfig,
    seed: int,
    prepare: bool = True,
    force: bool = False,
) -> None:
    """For a validated config: check the run directory, prepare the data once (ranks never race
    to build it), or, when streaming, check that its tokenizer loads; then check_continuation,
    and convert the checkpoint a resume on another world size continues from (the ranks only
    load its universal form).

    prepare=False (a dry run, or a Slurm submission: the job prepares and converts when it
    starts) writes nothing, and checks the continuation where the data is already prepared (a
    resume's always is), so that a mismatch is found now rather than after the wait in the queue."""
    check_run_dir(run, checkpoint)
    manifest = open_data(data).manifest if prepare else prepared_manifest(data)
    if manifest is not None:
        path = check_continuation(manifest, topology, checkpoint=checkpoint, model=model, data=data, deepspeed=deepspeed, seed=seed)
        if path is not None and prepare:
            convert_for_resume(path, cluster=cluster, checkpoint=checkpoint, force=force)


def check_continuation(
    manifest: dict,
    topology: Topology,
    *,
    checkpoint: CheckpointConfig,
    model: ModelConfig,
    data: DataConfig,
    deepspeed: DeepSpeedConfig,
    seed: int,
) -> Optional[Path]:
    """What the run continues from fits it: the vocabulary, model.init_from's shape and tokenizer,
    and the checkpoint a resume would continue (model, tokenizer, data, seq_len, seed), so that a
    mismatch is refused here rather than in every rank. Returns that checkpoint where it was saved
    by another world size and loads only through DeepSpeed's universal form."""
    vocab_size = resolve_vocab_size(model, manifest["vocab_size"])
    if model.init_from:
        check_init_from(model, vocab_size, manifest["tokenizer_hash"])
    resume = newest_checkpoint(checkpoint.dir, checkpoint.resume)
    if resume is not None and check_resumable(
        resume,
        model=model,
        data=data,
        seed=seed,
        deepspeed=deepspeed,
        data_manifest=manifest,
        world_size=topology.world_size,
        expert=topology.expert,
    ):
        return resume
    return None


def convert_for_resume(path: Path, *, cluster: ClusterConfig, checkpoint: CheckpointConfig, force: bool = False) -> Path:
    """Convert the checkpoint at `path` to DeepSpeed's universal form on this node, before any rank
    starts, with as many workers as cluster.host_memory_gb allows (trainer/universal.py); refused
    with the numbers where not even one of each fits, unless forced (launcher.force)."""
    plan = plan_conversion(checkpoint_sizes(path), conversion_budget(cluster.host_memory_gb), cluster.storage_gb_s)
    if plan.fits is False:
        if not force:
            raise ConfigError(conversion_refusal(path, plan, cluster))
        log.warning("launcher.force=true: converting although %s", conversion_refusal(path, plan, cluster))
    return convert(path, plan, checkpoint.universal_timeout_s)
