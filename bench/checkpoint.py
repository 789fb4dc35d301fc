"""Checkpoint cost: how long the training loop is blocked by a save, bare DeepSpeed against
zeroforge's atomic commit, synchronous and asynchronous; and the disk's write rate.

    python bench/checkpoint.py [--repeats 3] [overrides ...]      (default model=llama-125m, ZeRO-2, one CPU rank)

In one process and one engine, --repeats rounds, each saving once in each of three ways:
- bare: DeepSpeed's engine.save_checkpoint, then fsync of every file and directory it wrote (the
  baseline: the same durability as zeroforge's commit, without checksums, manifest or renames);
- sync: zeroforge's Checkpointer.save (DeepSpeed's save, fsync, sha256 of every file, manifest,
  rename, `latest`);
- async: Checkpointer.save with checkpoint.async_save (the snapshot), then one training step,
  then commit_pending (whatever of the write the step did not hide, and the commit).
Round i starts at the i-th way (bare, sync, async; then sync, async, bare; ...), so that neither
a slow stretch of a shared machine nor going first or last falls on one way only (a multiple of 3
rounds puts each way in each place equally often). Each save's
output is deleted before the next save starts: every save finds the same free disk, and the page
cache holds none of an earlier save's pages (deleting a file drops its cached pages; fsync only
writes them out). The cache is not dropped otherwise (that needs root), so sync's sha256 reads
what it just wrote from memory, as it does in training. The saves go to a new directory under
$TMPDIR (default /tmp): point TMPDIR at the filesystem whose rate you want (a cluster's shared one).

The table shows each way's median over the rounds, every round's figure, and the median of the
rounds' ratios to the same round's bare save. The disk write rate is the checkpoint's bytes over
the median bare save: what a save achieves on this filesystem with fsync (serializing included,
so at most the disk's own rate), not the page cache's.
Prints a table and writes bench/results/checkpoint.json.
Goal: async blocks the loop for less than half of sync.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WAYS = ("bare", "sync", "async")


def _fsync_written(root: Path) -> None:
    """fsync every file and directory under root, and root's own entry in its parent: what
    zeroforge's commit makes durable before `latest` moves."""
    for directory, _, files in os.walk(root):
        for name in files:
            with open(Path(directory) / name, "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(root.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _bytes_under(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each saves once in each way")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

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
    dirs = {way: scratch / way for way in WAYS}
    direct = engine.checkpoint_engine
    sync = Checkpointer(engine, compose_config([*base, f"checkpoint.dir={dirs['sync']}"]).checkpoint, dist, identity)
    # An async Checkpointer installs its background writer as the engine's checkpoint engine;
    # each way below puts back the one it saves through.
    asynchronous = Checkpointer(
        engine, compose_config([*base, f"checkpoint.dir={dirs['async']}", "checkpoint.async_save=true"]).checkpoint, dist, identity
    )
    writer = engine.checkpoint_engine
    saves = size = 0
    step_s: list[float] = []

    def save(way: str) -> float:
        """One save the given way: the seconds the loop was blocked."""
        nonlocal saves, size
        saves += 1  # a new step_<N> every save, as in training
        state = TrainState(step=saves)
        if way == "bare":
            engine.checkpoint_engine = direct
            started = time.perf_counter()
            engine.save_checkpoint(str(dirs[way]), tag=f"save_{saves}", save_latest=False)
            _fsync_written(dirs[way])
            blocked = time.perf_counter() - started
            size = _bytes_under(dirs[way])
        elif way == "sync":
            engine.checkpoint_engine = direct
            blocked = sync.save(state)
        else:
            engine.checkpoint_engine = writer
            blocked = asynchronous.save(state)
            step_s.append(one_step())
            blocked += asynchronous.commit_pending()
        shutil.rmtree(dirs[way])
        return blocked

    rounds: list[dict[str, float]] = []
    orders: list[tuple[str, ...]] = []
    for r in range(args.repeats):
        order = WAYS[r % len(WAYS) :] + WAYS[: r % len(WAYS)]
        orders.append(order)
        rounds.append({way: save(way) for way in order})
    engine.checkpoint_engine = direct
    shutil.rmtree(scratch, ignore_errors=True)

    median = {way: statistics.median(r[way] for r in rounds) for way in WAYS}
    # Each round's ratio to that round's baseline, then their median: a slow stretch of the
    # machine moves both sides of a ratio alike.
    over_bare = {way: statistics.median(r[way] / r["bare"] for r in rounds) for way in WAYS}
    async_over_sync = statistics.median(r["async"] / r["sync"] for r in rounds)
    write_gib_s = size / 2**30 / median["bare"]
    result = {
        "model": cfg.model.name,
        "zero_stage": cfg.deepspeed.stage,
        "device": device,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "checkpoint_bytes": size,
        "step_s": statistics.median(step_s),
        "blocked_s": median,
        "rounds_s": {way: [r[way] for r in rounds] for way in WAYS},
        "round_orders": orders,
        "over_bare": over_bare,
        "sync_over_bare": over_bare["sync"],
        "async_over_sync": async_over_sync,
        "disk_write_gib_s": write_gib_s,
        "disk_write_gib_s_rounds": [size / 2**30 / r["bare"] for r in rounds],
    }
    print(
        f"{cfg.model.name}, ZeRO-{cfg.deepspeed.stage}, {device}: checkpoint {size / 2**30:.2f} GiB, "
        f"one training step {result['step_s']:.2f} s; medians of {args.repeats} rotated rounds"
    )
    print(f"{'save':<8}{'loop blocked (s)':>18}{'x bare':>9}   each round (s)")
    for way in WAYS:
        each = " ".join(f"{r[way]:.2f}" for r in rounds)
        print(f"{way:<8}{median[way]:>18.2f}{over_bare[way]:>9.2f}   {each}")
    print(f"disk write rate (bare save, fsynced) = {write_gib_s:.2f} GiB/s")
    print(f"async / sync = {async_over_sync:.2f} (goal < 0.5)")
    out = REPO / "bench" / "results" / "checkpoint.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    distributed.close()


if __name__ == "__main__":
    main()
