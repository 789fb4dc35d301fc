"""train(cfg): init -> build -> loop -> save and export, in that order, top to bottom.

Entry points: `zeroforge train [overrides]`, `torchrun --nproc_per_node N -m zeroforge.trainer.train`.
"""

from __future__ import annotations

import logging
import random
import time

import numpy as np
import torch
from omegaconf import DictConfig

from zeroforge.data.boundaries import DocumentBoundaries
from zeroforge.data.build import open_data
from zeroforge.data.config import plain
from zeroforge.trainer import distributed
from zeroforge.trainer.checkpoint import Checkpointer, check_resumable, find_resume_checkpoint
from zeroforge.trainer.config import as_config
from zeroforge.trainer.engine import build_engine, train_step
from zeroforge.trainer.entry import entry_point
from zeroforge.trainer.faults import FaultGuard
from zeroforge.trainer.hf_export import export_hf, planned_entries
from zeroforge.trainer.host_memory import log_startup, rss_bytes
from zeroforge.trainer.log import setup_logging
from zeroforge.trainer.metrics import MetricsLogger
from zeroforge.trainer.model import check_init_from, flops_per_token, resolve_vocab_size
from zeroforge.trainer.moe import active_params
from zeroforge.trainer.partitioned import build_for_training, full_numel
from zeroforge.trainer.preemption import Preempted, StopRequest
from zeroforge.trainer.rundir import check_run_dir, library_versions, write_run_dir
from zeroforge.trainer.sequence_parallel import sequence_parallel
from zeroforge.trainer.stragglers import StragglerWatch
from zeroforge.trainer.train_state import TrainState, gathered_rng_states
from zeroforge.trainer.universal import universal_checkpoint
from zeroforge.trainer.validate import validate
from zeroforge.trainer.validator import Validator
from zeroforge.trainer.watchdog import DEFAULT_HANG_TIMEOUT_S, HANG_GRACE_S, Watchdog, enable_flight_recorder, node_name

log = logging.getLogger("zeroforge")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(composed: DictConfig) -> dict:
    """Train, checkpoint and export; returns the last logged metrics record (rank 0) or {}."""
    env = distributed.dist_env()
    setup_logging(env.rank, composed.logging.level)
    topology = validate(composed, env.world_size)  # before any process group, data or model exists
    cfg = as_config(composed)
    check_run_dir(cfg.run, cfg.checkpoint)
    device = f"cuda:{env.local_rank}" if topology.device == "cuda" else "cpu"
    stop = StopRequest(device, cfg.run.dir, env.rank)  # from here on, a stop request is answered by a save
    enable_flight_recorder()  # before the process group: what a hang report names comes from it
    hang_timeout_s = cfg.cluster.hang_timeout_s or DEFAULT_HANG_TIMEOUT_S
    # torch's own collective timeout only after the watchdog's, so that the watchdog names the hang.
    dist = distributed.init_distributed(topology.device, max(hang_timeout_s, cfg.cluster.startup_timeout_s) + 2 * HANG_GRACE_S)
    hosts = distributed.gather(node_name(), dist)
    watchdog = Watchdog(
        cfg.run.dir,
        rank=dist.rank,
        hosts=hosts,
        hang_timeout_s=hang_timeout_s,
        startup_timeout_s=cfg.cluster.startup_timeout_s,
    ).start()

    train_data = distributed.rank_zero_first(dist, lambda: open_data(cfg.data))  # prepared shards, or a stream
    tokenizer = train_data.tokenizer
    vocab_size = resolve_vocab_size(cfg.model, len(tokenizer))
    if cfg.model.init_from:
        check_init_from(cfg.model, vocab_size, train_data.manifest["tokenizer_hash"])
    resume_from = find_resume_checkpoint(cfg.checkpoint.dir, cfg.checkpoint.resume, dist)
    universal = False
    if resume_from is not None and check_resumable(
        resume_from,
        model=composed.model,
        data=composed.data,
        seed=composed.seed,
        deepspeed=composed.deepspeed,
        data_manifest=train_data.manifest,
        world_size=dist.world_size,
        expert=topology.expert,
    ):
        universal, resume_from = True, universal_checkpoint(resume_from, dist)
    if dist.is_main:
        write_run_dir(composed, probe_gpu=True)

    started, before = time.perf_counter(), rss_bytes()
    seed_everything(cfg.seed)
    model = build_for_training(
        model_config=cfg.model,
        optim=cfg.optim,
        deepspeed=cfg.deepspeed,
        topology=topology,
        vocab_size=vocab_size,
        eos_id=tokenizer.eos_token_id,
    )
    num_params = sum(full_numel(p) for p in model.parameters())
    active = active_params(((name, full_numel(p)) for name, p in model.named_parameters()), model.config)
    fpt = flops_per_token(model.config, active, cfg.data.seq_len)
    sequence = sequence_parallel(model, topology, cfg.deepspeed.stage)
    engine = build_engine(
        model,
        model_config=cfg.model,
        train=cfg.train,
        optim=cfg.optim,
        deepspeed=cfg.deepspeed,
        topology=topology,
        sequence=sequence,
        load_universal=universal,
    )
    planned_entries(engine.module, dist)  # the export's names and shapes, checked now rather than after training
    partitioned = cfg.deepspeed.stage == 3 and cfg.deepspeed.zero_init
    log_startup(dist, time.perf_counter() - started, "partitioned construction" if partitioned else "whole model on every rank", before)
    guard = FaultGuard(cfg.train, engine.basic_optimizer, cfg.deepspeed.stage)
    log.info(
        "%s: %.2fM parameters (%.2fM active) | world size %d (sequence parallel %d, expert parallel %d) | ZeRO-%d | %s"
        " | micro batch %d x grad accum %d x dp %d = %d",
        cfg.model.name,
        num_params / 1e6,
        active / 1e6,
        dist.world_size,
        topology.sequence,
        topology.expert,
        cfg.deepspeed.stage,
        topology.precision,
        cfg.train.micro_batch_size,
        topology.grad_accum,
        topology.dp_size,
        cfg.train.global_batch_size,
    )

    # What every checkpoint records of the run, beside its state; the config goes to wandb too.
    identity = {
        "tokenizer_hash": train_data.manifest["tokenizer_hash"],
        "world_size": dist.world_size,
        "expert_parallel": topology.expert,
        "config": plain(composed),
        "versions": library_versions(),
    }
    checkpointer = Checkpointer(engine, cfg.checkpoint, dist, identity)
    state = TrainState()
    if resume_from is not None:
        state = checkpointer.load(resume_from)
        state.restore_rng(dist)
    guard.skipped = state.skipped_steps
    loader = train_data.loader(
        cfg.seed,
        cfg.train.global_batch_size,
        cfg.train.micro_batch_size,
        topology.dp_rank(dist.rank),
        topology.dp_size,
        pin_memory=topology.device == "cuda",
    )
    if resume_from is not None:
        loader.load_state_dict(state.data)  # before the first batch: its iterator starts there
    boundaries = None
    if cfg.data.reset_position_ids or cfg.data.mask_cross_document_loss:
        boundaries = DocumentBoundaries(tokenizer.eos_token_id, cfg.data.reset_position_ids, cfg.data.mask_cross_document_loss)
    metrics = MetricsLogger(
        cfg.logging,
        run=cfg.run,
        run_config=identity["config"],
        steps=cfg.train.steps,
        peak=cfg.cluster.peak_tflops,
        dist=dist,
        topology=topology,
        flops_per_token=fpt,
        stragglers=StragglerWatch(dist, factor=cfg.logging.straggler_factor, intervals=cfg.logging.straggler_intervals, hosts=hosts),
        start_step=state.step,
        start_tokens=state.tokens,
    )
    validator = Validator(
        cfg.eval,
        engine,
        train_data.validation_batches(cfg.eval.batch_size, cfg.eval.batches),
        tokenizer,
        metrics,
        device,
        # Every forward is collective under ZeRO-3 (gathers) and expert parallelism (all-to-all).
        synced_gpus=(cfg.deepspeed.stage == 3 or topology.expert > 1) and dist.world_size > 1,
    )

    def snapshot() -> TrainState:
        return TrainState(
            step=step,
            tokens=metrics.tokens,
            data=loader.global_state(distributed.gather(loader.state_dict(), dist)),  # a streaming rank knows only its partitions
            rng=gathered_rng_states(dist),
            skipped_steps=guard.skipped,
        )

    last: dict = {}
    step = state.step
    while step < cfg.train.steps:
        step += 1
        with metrics.data_wait:
            batch = loader.next_batch()
        result = train_step(engine, batch, device, metrics.logs_at(step), guard, step, boundaries, sequence)
        last = (
            metrics.step(
                step,
                None if result.skipped else result.loss,
                result.grad_norm,
                result.lr,
                guard.skipped,
                aux_loss=result.aux_loss,
                expert_tokens=result.expert_tokens,
            )
            or last
        )
        with metrics.paused:
            checkpointer.commit_pending()  # an async save commits once the next step is done
        if cfg.data.mixture and metrics.logs_at(step):
            metrics.write({"step": step, **{f"data_share/{k}": v for k, v in loader.mixture_shares().items()}})
        with metrics.paused:
            validator.maybe_validate(step)
        # Asked after the validation, so that a stop requested during it is answered at this step.
        stop_requested = stop.agreed()
        exit_now = cfg.train.exit_interval is not None and step % cfg.train.exit_interval == 0 and step < cfg.train.steps
        with metrics.paused:
            checkpointer.maybe_save(snapshot, step, final=stop_requested or exit_now or step == cfg.train.steps)
        if stop_requested:
            stop.request_requeue(step, "stop requested")
            metrics.close()
            raise Preempted(f"stop requested: saved step {step}; a restart resumes from it")
        if exit_now:
            stop.request_requeue(step, "train.exit_interval")
            log.info("step %d: train.exit_interval=%d reached; stopping, a restart resumes here", step, cfg.train.exit_interval)
            break
        watchdog.progress(step)
    stop.close()
    if step == cfg.train.steps:
        export_hf(
            engine,
            tokenizer,
            cfg.checkpoint.export_dir,
            dist,
            {"step": step, "tokens": metrics.tokens, "prepared_data": str(train_data.prepared.resolve()) if train_data.prepared else None},
            shard_bytes=int(cfg.export.shard_size_gb * 2**30),
        )
    metrics.close()
    watchdog.close()
    distributed.close()
    return last


@entry_point
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
