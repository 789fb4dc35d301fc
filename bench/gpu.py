"""GPU throughput: tokens/s and MFU of the real trainer on one GPU, bf16, llama-125m and llama-1b.

    python bench/gpu.py [--steps 40] [--models llama-125m llama-1b] [--overrides deepspeed=zero3 ...]

Runs `zeroforge train` per model at seq_len 2048 on the embedded corpus (tokenizer
vocabulary 32,000, so the output layer has a realistic share of the FLOPs), reads its
metrics.jsonl, prints a table and writes bench/results/gpu.json. MFU uses the peak of the
detected GPU (trainer/metrics.py PEAK_TFLOPS).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MICRO_BATCH = {"llama-125m": 16, "llama-1b": 8}


def run(model: str, steps: int, log_every: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        args = [
            f"model={model}", "deepspeed=zero2", "train.precision=bf16", "data.seq_len=2048",
            "data.tokenizer_vocab_size=32000", f"train.micro_batch_size={MICRO_BATCH.get(model, 8)}",
            f"train.global_batch_size={MICRO_BATCH.get(model, 8)}", f"train.steps={steps}",
            f"logging.every={log_every}", "eval.every=0", "checkpoint.every=0", "logging.wandb.mode=disabled",
            f"run.dir={run_dir}", *overrides,
        ]
        subprocess.run([sys.executable, "-m", "zeroforge.trainer.train", *args], cwd=REPO, check=True)
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "loss" in r and r["step"] > log_every]  # past the warm-up interval
    return {
        "model": model,
        "tokens_per_s": sum(r["tokens_per_s"] for r in timed) / len(timed),
        "mfu": sum(r["mfu"] for r in timed) / len(timed) if timed[0]["mfu"] is not None else None,
        "mem_gb": max(r["mem_gb"] for r in timed),
        "final_loss": timed[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=["llama-125m", "llama-1b"])
    parser.add_argument("--overrides", nargs="*", default=[], help="more Hydra overrides for every run")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu.json"))
    args = parser.parse_args()

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    results = [run(m, args.steps, args.log_every, args.overrides) for m in args.models]
    print(f"device: {device}")
    print(f"{'model':<12}{'tokens/s':>12}{'MFU':>8}{'mem GB':>9}")
    for r in results:
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(f"{r['model']:<12}{r['tokens_per_s']:>12.0f}{mfu:>8}{r['mem_gb']:>9.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": device, "results": results}, indent=2))


if __name__ == "__main__":
    main()
