"""What every launch does before any rank starts, so that mistakes surface before GPUs are held."""

from __future__ import annotations

from zeroforge.data.build import open_data, prepared_manifest
from zeroforge.data.config import DataConfig
from zeroforge.trainer.checkpoint import check_resumable, newest_checkpoint
from zeroforge.trainer.config import CheckpointConfig, DeepSpeedConfig, ModelConfig, RunSection
from zeroforge.trainer.model import check_init_from, resolve_vocab_size
from zeroforge.trainer.rundir import check_run_dir
from zeroforge.trainer.topology import Topology


def preflight(
    topology: Topology,
    *,
    run: RunSection,
    checkpoint: CheckpointConfig,
    model: ModelConfig,
    data: DataConfig,
    deepspeed: DeepSpeedConfig,
    seed: int,
    prepare: bool = True,
) -> None:
    """For a validated config: check the run directory, prepare the data once (ranks never race
    to build it), or, when streaming, check that its tokenizer loads; then check_continuation.

    prepare=False (a dry run, or a Slurm job, which prepares its data when it starts) writes
    nothing, and checks the continuation where the data is already prepared (a resume's always
    is), so that a mismatch is found now rather than after the wait in the queue."""
    check_run_dir(run, checkpoint)
    manifest = open_data(data).manifest if prepare else prepared_manifest(data)
    if manifest is not None:
        check_continuation(manifest, topology, checkpoint=checkpoint, model=model, data=data, deepspeed=deepspeed, seed=seed)


def check_continuation(
    manifest: dict,
    topology: Topology,
    *,
    checkpoint: CheckpointConfig,
    model: ModelConfig,
    data: DataConfig,
    deepspeed: DeepSpeedConfig,
    seed: int,
) -> None:
    """What the run continues from fits it: the vocabulary, model.init_from's shape and tokenizer,
    and the checkpoint a resume would continue (model, tokenizer, data, seq_len, seed), so that a
    mismatch is refused here rather than in every rank."""
    vocab_size = resolve_vocab_size(model, manifest["vocab_size"])
    if model.init_from:
        check_init_from(model, vocab_size, manifest["tokenizer_hash"])
    resume = newest_checkpoint(checkpoint.dir, checkpoint.resume)
    if resume is not None:
        check_resumable(
            resume, model=model, data=data, seed=seed, deepspeed=deepspeed, data_manifest=manifest, world_size=topology.world_size
        )
