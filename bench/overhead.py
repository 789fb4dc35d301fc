"""Trainer overhead: tokens/s of zeroforge's loop against a bare DeepSpeed loop and plain PyTorch.

    python bench/overhead.py [--steps 60] [--warmup 10] [--threads N] [overrides ...]

Each loop runs in its own process on the same model, batch, sequence length and thread count;
the trainer is the real `zeroforge train`, read back from its metrics.jsonl. The three
loops take turns for --repeats rounds and each keeps its best round, since a shared machine only
ever makes a loop slower. Prints a table and writes bench/results/overhead.json.
Goal: trainer >= 0.97 x bare DeepSpeed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _batches(cfg, count: int):
    """Real windows from the prepared training split, the same for every loop."""
    import torch

    from zeroforge.data.loader import BatchLoader
    from zeroforge.data.prepare import prepare
    from zeroforge.data.shards import TokenStore

    loader = BatchLoader(
        TokenStore(prepare(cfg.data), "train"),
        cfg.data.seq_len,
        cfg.seed,
        cfg.train.global_batch_size,
        cfg.train.micro_batch_size,
        dp_rank=0,
        dp_size=1,
    )
    return [[b.to(torch.long) for b in loader.next_batch()] for _ in range(count)]


def _model(cfg):
    """The trainer's model with the trainer's loss (train.loss), so the loops differ, not the losses."""
    from zeroforge.data.prepare import prepare
    from zeroforge.data.shards import load_manifest
    from zeroforge.trainer.loss import install_loss, resolve_loss
    from zeroforge.trainer.model import build_model, resolve_vocab_size
    from zeroforge.trainer.train import seed_everything

    seed_everything(cfg.seed)
    vocab = resolve_vocab_size(cfg.model, load_manifest(prepare(cfg.data))["vocab_size"])
    model = build_model(cfg.model, vocab)
    install_loss(model, resolve_loss(cfg.train.loss, cfg.model.model_type), cfg.train.loss_chunk_tokens)
    return model


def worker(kind: str, overrides: list[str], steps: int, warmup: int) -> float:
    """Tokens/s of one bare loop after warmup steps."""
    import torch

    from zeroforge.trainer.config import compose_config
    from zeroforge.trainer.engine import causal_lm_loss, fused_adamw, param_groups
    from zeroforge.trainer.validate import validate

    cfg = compose_config(overrides)
    topology = validate(cfg, 1, cuda=False)
    batches = _batches(cfg, steps)
    model = _model(cfg)
    o = cfg.optim
    # torch's AdamW as the trainer builds it (its SkippableAdamW only adds a flag), fused or not alike.
    opt = torch.optim.AdamW(
        param_groups(model, o.weight_decay),
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
        fused=fused_adamw(cfg.optim, topology),
    )
    if kind == "deepspeed":
        import deepspeed

        from zeroforge.trainer.deepspeed_config import deepspeed_config
        from zeroforge.trainer.distributed import init_distributed

        init_distributed("cpu")
        model, _, _, _ = deepspeed.initialize(
            model=model, optimizer=opt, config=deepspeed_config(optim=cfg.optim, deepspeed=cfg.deepspeed, topology=topology)
        )

        def step(micro_batches):
            for b in micro_batches:
                model.backward(causal_lm_loss(model, b))
                model.step()
    else:

        def step(micro_batches):
            for b in micro_batches:
                (causal_lm_loss(model, b) / len(micro_batches)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)

    model.train()
    for i, micro_batches in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        step(micro_batches)
    return (steps - warmup) * topology.tokens_per_step / (time.perf_counter() - start)


def trainer_tokens_per_s(overrides: list[str], steps: int, warmup: int, env: dict) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        args = [
            *overrides,
            f"run.dir={run_dir}",
            f"train.steps={steps}",
            f"logging.every={warmup}",
            "logging.wandb.mode=disabled",
            "eval.every=0",
            "checkpoint.every=0",
        ]
        subprocess.run([sys.executable, "-m", "zeroforge.trainer.train", *args], cwd=REPO, env=env, check=True, capture_output=True)
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    # Intervals after the warm-up: total tokens over total time, not a mean of rates.
    timed = [r for r in records if "loss" in r and r["step"] > warmup]
    tokens = [b["tokens"] - a["tokens"] for a, b in zip([r for r in records if r["step"] >= warmup], timed)]
    seconds = sum(t / r["tokens_per_s"] for t, r in zip(tokens, timed))
    return sum(tokens) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=["deepspeed", "pytorch"])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "overhead.json"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps({"tokens_per_s": worker(args.worker, args.overrides, args.steps, args.warmup)}))
        return

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    rounds: dict[str, list[float]] = {"trainer": [], "deepspeed": [], "pytorch": []}
    for _ in range(args.repeats):
        rounds["trainer"].append(trainer_tokens_per_s(args.overrides, args.steps, args.warmup, env))
        for kind in ("deepspeed", "pytorch"):
            out = subprocess.run(
                [sys.executable, __file__, "--worker", kind, "--steps", str(args.steps), "--warmup", str(args.warmup), *args.overrides],
                cwd=REPO,
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            rounds[kind].append(json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"])
    results = {kind: max(values) for kind, values in rounds.items()}

    print(f"{'loop':<12}{'tokens/s':>12}{'vs DeepSpeed':>14}")
    for kind, tps in results.items():
        print(f"{kind:<12}{tps:>12.0f}{tps / results['deepspeed']:>14.3f}")
    ratio = results["trainer"] / results["deepspeed"]
    print(f"trainer / bare DeepSpeed = {ratio:.3f} (goal >= 0.97): {'met' if ratio >= 0.97 else 'NOT met'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "threads": args.threads,
                "steps": args.steps,
                "warmup": args.warmup,
                "overrides": args.overrides,
                "tokens_per_s": results,
                "rounds": rounds,
                "trainer_vs_deepspeed": ratio,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
