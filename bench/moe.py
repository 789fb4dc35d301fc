"""Mixture of experts: tokens/s and memory per rank of the tiny MoE made wider, every expert on
each rank (parallel.expert=1) against half of them on each (parallel.expert=2), on 2 ranks in one run.

    python bench/moe.py [--steps 20] [--warmup 3] [--repeats 3] [--cuda] [overrides ...]

Each case runs in its own 2 processes (torchrun on gloo, one thread each) and builds the trainer's
model and engine (ZeRO-1, fp32, DeepSpeed's AutoEP in both cases) from the config; after the warm-up
steps it times the measured ones. The cases take turns, `--repeats` times each, and the median
round is kept. Per rank it reports the expert parameters the rank holds (exact), its resident
memory at the end with freed heap handed back to the system (the highest rank's), and the
process's peak (which includes the whole model: at ZeRO 0-2 every rank builds it before AutoEP
keeps its experts). Prints a table and writes
bench/results/moe.json. Goal: each rank holds half the expert parameters at parallel.expert=2;
the tokens/s of each split is measured (on the CPU the all-to-all is gloo's, so speed is for the
GPU sweep, bench/device_sweep.sh, which runs it with --cuda: a small Qwen3-MoE shape in bf16, with
MFU from the active parameters).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# On GPUs (--cuda, bench/device_sweep.sh): a small Qwen3-MoE shape, 32 experts of which 4 per token,
# in bf16 on 2 GPUs where the machine has them (else parallel.expert=1 on one).
GPU_SHAPE = [
    "model=tiny-moe",
    "model.hidden_size=1024",
    "model.num_layers=8",
    "model.num_heads=16",
    "model.num_kv_heads=4",
    "model.extra.num_experts=32",
    "model.extra.num_experts_per_tok=4",
    "model.extra.moe_intermediate_size=512",
    "model.extra.head_dim=64",
    "model.vocab_size=32768",
    "data.seq_len=2048",
    "train.micro_batch_size=4",
    "train.precision=bf16",
]
# tiny-moe with 8 wider experts a layer: the experts are most of the model, as in real MoEs.
WIDE = [
    "model=tiny-moe",
    "model.hidden_size=256",
    "model.num_layers=4",
    "model.extra.num_experts=8",
    "model.extra.moe_intermediate_size=1024",
    "model.extra.head_dim=64",
    "model.vocab_size=4096",
]


def worker(expert: int, steps: int, warmup: int, cuda: bool, overrides: list[str]) -> None:
    import torch

    from zeroforge.trainer import distributed
    from zeroforge.trainer.config import compose_config
    from zeroforge.trainer.engine import build_engine, train_step
    from zeroforge.trainer.faults import FaultGuard
    from zeroforge.trainer.host_memory import peak_rss_bytes, rss_bytes
    from zeroforge.trainer.metrics import peak_tflops
    from zeroforge.trainer.model import flops_per_token
    from zeroforge.trainer.moe import active_params, is_expert_param
    from zeroforge.trainer.partitioned import build_for_training
    from zeroforge.trainer.validate import validate

    env = distributed.dist_env()
    shape = GPU_SHAPE if cuda else [*WIDE, "data.seq_len=256", "train.micro_batch_size=4", "train.precision=fp32"]
    cfg = compose_config(
        [
            *shape,
            f"train.global_batch_size={env.world_size * 4}",
            "deepspeed=zero1",
            f"parallel.expert={expert}",
            *overrides,
        ]
    )
    topology = validate(cfg, env.world_size, cuda=cuda)
    info = distributed.init_distributed(topology.device)
    device = f"cuda:{info.local_rank}" if cuda else "cpu"
    torch.manual_seed(cfg.seed)
    vocab = cfg.model.vocab_size
    model = build_for_training(
        model_config=cfg.model, optim=cfg.optim, deepspeed=cfg.deepspeed, topology=topology, vocab_size=vocab, eos_id=None
    )
    active = active_params(((n, p.numel()) for n, p in model.named_parameters()), model.config)
    flops = flops_per_token(model.config, active, cfg.data.seq_len)
    engine = build_engine(model, model_config=cfg.model, train=cfg.train, optim=cfg.optim, deepspeed=cfg.deepspeed, topology=topology)
    guard = FaultGuard(cfg.train, engine.basic_optimizer, cfg.deepspeed.stage)
    held = sum(p.numel() for n, p in engine.module.named_parameters() if is_expert_param(n))
    generator = torch.Generator().manual_seed(info.rank)
    batch = [torch.randint(0, vocab, (cfg.train.micro_batch_size, cfg.data.seq_len + 1), generator=generator)]
    for step in range(1, warmup + 1):
        train_step(engine, batch, device, False, guard, step)
    synchronize(topology.device)
    started = time.perf_counter()
    for step in range(warmup + 1, warmup + steps + 1):
        loss = train_step(engine, batch, device, False, guard, step).loss
    synchronize(topology.device)
    seconds = time.perf_counter() - started
    # Freed heap back to the system first: AutoEP slices the experts out of a model built whole on
    # every rank, whose freed pages glibc would otherwise keep resident.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    mine = {"held": held, "rss_gib": rss_bytes() / 2**30, "peak_gib": peak_rss_bytes() / 2**30, "loss": float(loss)}
    ranks = distributed.gather(mine, info)
    distributed.close()
    if env.is_main:
        tokens = steps * cfg.train.global_batch_size * cfg.data.seq_len
        peak = peak_tflops(None, topology.device)
        record = {
            "tokens_per_s": tokens / seconds,
            "mfu": None if peak is None else flops * tokens / seconds / (peak * 1e12 * env.world_size),
            "active_params": active,
            "expert_params_per_rank": [r["held"] for r in ranks],
            "rss_gib": max(r["rss_gib"] for r in ranks),
            "peak_gib": max(r["peak_gib"] for r in ranks),
            "final_loss": ranks[0]["loss"],
        }
        print(json.dumps(record))


def synchronize(device: str) -> None:
    import torch
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.synchronize()
    dist.barrier()


def run_case(expert: int, steps: int, warmup: int, ranks: int, cuda: bool, overrides: list[str]) -> dict:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not cuda:
        env["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cpu")
    args = ["--worker", str(expert), "--steps", str(steps), "--warmup", str(warmup), *(["--cuda"] if cuda else []), *overrides]
    out = subprocess.run([*launcher, __file__, *args], cwd=REPO, env=env, check=True, capture_output=True, text=True)
    return json.loads(next(line for line in reversed(out.stdout.splitlines()) if line.startswith("{")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", type=int, help="run one case's rank with this parallel.expert")
    parser.add_argument("--cuda", action="store_true", help="GPUs: the small Qwen3-MoE shape in bf16 on up to 2 of them")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "moe.json"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.warmup, args.cuda, args.overrides)
        return
    from zeroforge.trainer.rundir import git_commit

    ranks = 2
    if args.cuda:
        import torch

        ranks = min(2, torch.cuda.device_count())  # NCCL takes one rank a GPU
    rounds: dict[int, list[dict]] = {e: [] for e in (1, 2) if e <= ranks}
    for _ in range(args.repeats):
        for expert in rounds:
            rounds[expert].append(run_case(expert, args.steps, args.warmup, ranks, args.cuda, args.overrides))
    cases = {}
    for expert, runs in rounds.items():
        median = statistics.median(r["tokens_per_s"] for r in runs)
        cases[expert] = {
            **min(runs, key=lambda r: abs(r["tokens_per_s"] - median)),
            "tokens_per_s_rounds": [r["tokens_per_s"] for r in runs],
        }
    where = f"{ranks} GPU(s) (nccl), bf16" if args.cuda else f"{ranks} ranks (gloo, 1 thread each), fp32"
    print(f"{where}, ZeRO-1; model {' '.join(GPU_SHAPE if args.cuda else WIDE)}; {args.steps} measured steps")
    print(f"{'parallel.expert':<17}{'tokens/s':>10}{'MFU':>8}{'expert params / rank':>22}{'RSS GiB / rank':>16}{'peak GiB':>10}")
    for expert, r in cases.items():
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        held = max(r["expert_params_per_rank"])
        print(f"{expert:<17}{r['tokens_per_s']:>10.0f}{mfu:>8}{held:>22,}{r['rss_gib']:>16.3f}{r['peak_gib']:>10.3f}")
    half, speed = None, None
    if 2 in cases:
        half = all(2 * held == max(cases[1]["expert_params_per_rank"]) for held in cases[2]["expert_params_per_rank"])
        speed = cases[2]["tokens_per_s"] / cases[1]["tokens_per_s"]
        print(f"each rank holds half the expert parameters at parallel.expert=2: {'met' if half else 'NOT met'}")
        print(f"tokens/s, parallel.expert 2 / 1 = {speed:.3f}; RSS per rank 2 / 1 = {cases[2]['rss_gib'] / cases[1]['rss_gib']:.3f}")
    else:
        print("one GPU: parallel.expert=2 needs two (NCCL takes one rank a GPU)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "overrides": [*(GPU_SHAPE if args.cuda else WIDE), *args.overrides],
                "ranks": ranks,
                "steps": args.steps,
                "cases": cases,
                "half_the_experts": half,
                "speed_ratio": speed,
                "commit": git_commit(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
