"""Checkpoint cost: how long the training loop is blocked by a save, bare DeepSpeed against
zeroforge's atomic commit, synchronous and asynchronous.

    python bench/checkpoint.py [--repeats 3] [overrides ...]      (default model=llama-125m, ZeRO-2, one CPU rank)

In one process and one engine, for --repeats rounds each:
- bare: DeepSpeed's engine.save_checkpoint (the baseline: no fsync, no checksums, no manifest);
- sync: zeroforge's Checkpointer.save (DeepSpeed's save, fsync, sha256 of every file, manifest,
  rename, `latest`);
- async: Checkpointer.save with checkpoint.async_save (the snapshot), then one training step,
  then commit_pending (whatever of the write the step did not hide, and the commit).
Each keeps its best round, since a shared machine only ever makes a save slower. Prints a table
and writes bench/results/checkpoint.json. Goal: async blocks the loop for less than half of sync.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from zeroforge.data.loader import BatchLoader
    from zeroforge.data.prepare import prepare
    from zeroforge.data.shards import TokenStore, load_manifest
    from zeroforge.trainer import distributed
    from zeroforge.trainer.checkpoint import Checkpointer
    from zeroforge.trainer.config import compose_config
    from zeroforge.trainer.engine import build_engine, train_step
    from zeroforge.trainer.faults import FaultGuard
    from zeroforge.trainer.model import build_model, resolve_vocab_size
    from zeroforge.trainer.train import seed_everything
    from zeroforge.trainer.train_state import TrainState
    from zeroforge.trainer.validate import validate

    scratch = Path(tempfile.mkdtemp(prefix="zeroforge-bench-ckpt-"))
    base = [
        "model=llama-125m",
        "deepspeed=zero2",
        "train.precision=fp32",
        "train.micro_batch_size=1",
        "train.global_batch_size=1",
        "data.seq_len=128",
        f"run.dir={scratch}",
        "checkpoint.keep_last=1",
        *args.overrides,
    ]
    cfg = compose_config(base)
    topology = validate(cfg, 1)
    dist = distributed.init_distributed(topology.device)
    device = topology.device
    prepared = prepare(cfg.data)
    seed_everything(cfg.seed)
    model = build_model(cfg.model, resolve_vocab_size(cfg.model, load_manifest(prepared)["vocab_size"]))
    engine = build_engine(model, model_config=cfg.model, train=cfg.train, optim=cfg.optim, deepspeed=cfg.deepspeed, topology=topology)
    guard = FaultGuard(cfg.train, engine.basic_optimizer, cfg.deepspeed.stage)
    loader = BatchLoader(TokenStore(prepared, "train"), cfg.data.seq_len, cfg.seed, 1, 1, dp_rank=0, dp_size=1)
    step = 0

    def one_step() -> float:
        nonlocal step
        step += 1
        started = time.perf_counter()
        train_step(engine, loader.next_batch(), device, False, guard, step)
        return time.perf_counter() - started

    one_step()  # optimizer states exist from here on, as in any real save
    identity = {"tokenizer_hash": "", "world_size": 1, "config": {"model": {}}}
    sync = Checkpointer(engine, compose_config([*base, f"checkpoint.dir={scratch}/sync"]).checkpoint, dist, identity)
    rounds: dict[str, list[float]] = {"bare": [], "sync": [], "async": []}
    step_s: list[float] = []
    size = 0
    for r in range(args.repeats):
        started = time.perf_counter()
        engine.save_checkpoint(str(scratch / "bare"), tag=f"round_{r}", save_latest=False)
        rounds["bare"].append(time.perf_counter() - started)
        size = sum(p.stat().st_size for p in (scratch / "bare").rglob("*") if p.is_file())
        shutil.rmtree(scratch / "bare")
        rounds["sync"].append(sync.save(TrainState(step=step + r)))
    asynchronous = Checkpointer(
        engine, compose_config([*base, f"checkpoint.dir={scratch}/async", "checkpoint.async_save=true"]).checkpoint, dist, identity
    )
    for _ in range(args.repeats):
        blocked = asynchronous.save(TrainState(step=step))  # step advances below: each save is a new step_<N>
        step_s.append(one_step())
        blocked += asynchronous.commit_pending()
        rounds["async"].append(blocked)
    shutil.rmtree(scratch, ignore_errors=True)

    best = {k: min(v) for k, v in rounds.items()}
    result = {
        "model": cfg.model.name,
        "zero_stage": cfg.deepspeed.stage,
        "device": device,
        "threads": torch.get_num_threads(),
        "checkpoint_bytes": size,
        "step_s": min(step_s),
        "blocked_s": best,
        "rounds_s": rounds,
        "sync_over_bare": best["sync"] / best["bare"],
        "async_over_sync": best["async"] / best["sync"],
    }
    print(
        f"{cfg.model.name}, ZeRO-{cfg.deepspeed.stage}, {device}: checkpoint {size / 2**30:.2f} GiB, one training step {min(step_s):.2f} s"
    )
    print(f"{'save':<8}{'loop blocked (s)':>18}{'x bare':>9}")
    for kind in ("bare", "sync", "async"):
        print(f"{kind:<8}{best[kind]:>18.2f}{best[kind] / best['bare']:>9.2f}")
    print(f"async / sync = {result['async_over_sync']:.2f} (goal < 0.5)")
    out = REPO / "bench" / "results" / "checkpoint.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    distributed.close()


if __name__ == "__main__":
    main()
