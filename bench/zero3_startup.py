"""ZeRO-3 start-up: time and peak host memory per rank to build the model and the DeepSpeed engine,
ZeRO-2 against ZeRO-3 with partitioned construction (and ZeRO-3 building the whole model first),
on CPU ranks.

    python bench/zero3_startup.py [--ranks 2 4] [--configs zero2 zero3 zero3-whole] [overrides ...]
        (default model=llama-125m model.vocab_size=32000: 110M parameters, fp32)

Each configuration and world size runs in its own torchrun (gloo), so every peak (VmHWM) is
that configuration's alone. A rank records the resident memory before the model exists (the
process's own: Python, torch, DeepSpeed, transformers), then builds the model and the engine
exactly as train() does (trainer/partitioned.py build_for_training, trainer/engine.py
build_engine), and reports the seconds that took and its peak. The table compares each peak with
ZeRO-2's at the same world size, in whole and above the process's own memory. Writes
bench/results/zero3_startup.json. Goal (the issue's): ZeRO-3 at most 0.65x ZeRO-2's peak.
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

CONFIGS = {
    "zero2": ["deepspeed=zero2"],
    "zero3": ["deepspeed=zero3"],
    "zero3-whole": ["deepspeed=zero3", "deepspeed.zero_init=false"],
}
MODEL = ["model=llama-125m", "model.vocab_size=32000"]


def worker(overrides: list[str]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from zeroforge.trainer import distributed
    from zeroforge.trainer.config import compose_config
    from zeroforge.trainer.engine import build_engine
    from zeroforge.trainer.host_memory import peak_rss_bytes, rss_bytes
    from zeroforge.trainer.model import hf_config
    from zeroforge.trainer.partitioned import build_for_training
    from zeroforge.trainer.train import seed_everything
    from zeroforge.trainer.validate import validate

    env = distributed.dist_env()
    cfg = compose_config(overrides)
    topology = validate(cfg, env.world_size)
    dist = distributed.init_distributed(topology.device)
    # The model's code (and torch._dynamo, which it imports) is loaded before the measurement, as
    # it is in train() by then: "before" is the process's own memory, the rest the model's.
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(hf_config(cfg.model, cfg.model.vocab_size))
    before = rss_bytes()
    started = time.perf_counter()
    seed_everything(cfg.seed)
    model = build_for_training(
        model_config=cfg.model, optim=cfg.optim, deepspeed=cfg.deepspeed, topology=topology, vocab_size=cfg.model.vocab_size, eos_id=None
    )
    build_engine(model, model_config=cfg.model, train=cfg.train, optim=cfg.optim, deepspeed=cfg.deepspeed, topology=topology)
    seconds = time.perf_counter() - started
    rows = distributed.gather({"rank": dist.rank, "s": seconds, "before_mib": before / 2**20, "peak_mib": peak_rss_bytes() / 2**20}, dist)
    if dist.is_main:
        print("RESULT " + json.dumps(rows), flush=True)
    distributed.close()


def run(config: str, ranks: int, extra: list[str], scratch: Path) -> list[dict]:
    overrides = [
        *MODEL,
        "train.precision=fp32",
        "train.micro_batch_size=1",
        f"train.global_batch_size={ranks}",
        f"run.dir={scratch / f'{config}-{ranks}'}",
        *CONFIGS[config],
        *extra,
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(ranks),
        str(Path(__file__).resolve()),
        "--worker",
        *overrides,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"{config} on {ranks} ranks failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.worker:
        worker(args.overrides)
        return

    configs = ["zero2", *[c for c in args.configs if c != "zero2"]]  # the baseline first
    scratch = Path(tempfile.mkdtemp(prefix="zeroforge-bench-zero3-"))
    results = []
    for ranks in args.ranks:
        for config in configs:
            rows = run(config, ranks, args.overrides, scratch)
            results.append({"config": config, "ranks": ranks, "per_rank": rows})
    print(
        "| config | ranks | start-up s (slowest rank) | peak MiB per rank | before the model MiB | peak / ZeRO-2 | above before / ZeRO-2's |"
    )
    print("| --- | ---: | ---: | --- | --- | ---: | ---: |")
    for r in results:
        base = next(b for b in results if b["config"] == "zero2" and b["ranks"] == r["ranks"])
        peak = max(x["peak_mib"] for x in r["per_rank"])
        base_peak = max(x["peak_mib"] for x in base["per_rank"])
        above = max(x["peak_mib"] - x["before_mib"] for x in r["per_rank"])
        base_above = max(x["peak_mib"] - x["before_mib"] for x in base["per_rank"])
        r.update(peak_ratio=peak / base_peak, above_ratio=above / base_above)
        peaks = ", ".join(str(round(x["peak_mib"])) for x in r["per_rank"])
        befores = ", ".join(str(round(x["before_mib"])) for x in r["per_rank"])
        seconds = max(x["s"] for x in r["per_rank"])
        print(f"| {r['config']} | {r['ranks']} | {seconds:.1f} | {peaks} | {befores} | {r['peak_ratio']:.3f} | {r['above_ratio']:.3f} |")
    out = REPO / "bench" / "results" / "zero3_startup.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": MODEL + args.overrides, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
