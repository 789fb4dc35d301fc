"""Long context: memory per rank of one training step, parallel.sequence 1 (one rank) against 2
(two ranks splitting every sequence with Ulysses), in one run.

    python bench/long_context.py [--seq-len 8192] [overrides ...]

Each case runs in its own processes (torchrun on gloo for 2 ranks, one thread each) and builds
the trainer's model and engine (ZeRO-0, fp32, the chunked loss) from the config; one warm-up step
creates the optimizer states, then a second step at the same length is measured: a thread samples
the resident memory every millisecond, and the step's figure is its peak above the resident
memory before the step (what the step itself adds: activations, the all-to-all's buffers,
gradients), beside the process's whole peak. The model is `tiny` made wider (hidden 512, MLP
2048), so that activations, not the CPU's attention time, set the length. Prints a table and
writes bench/results/long_context.json. Goal: the step's memory at parallel.sequence=2 is at most
0.6 x that at 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WIDE = ["model.hidden_size=512", "model.num_heads=8", "model.num_kv_heads=8", "model.intermediate_size=2048"]
GOAL = 0.6


class PeakSampler:
    """The highest resident memory seen while it runs, sampled every millisecond."""

    def __init__(self) -> None:
        from zeroforge.trainer.host_memory import rss_bytes

        self.rss, self.peak, self._stop = rss_bytes, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def __enter__(self) -> PeakSampler:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def worker(sequence: int, seq_len: int, overrides: list[str]) -> None:
    import torch

    from zeroforge.trainer import distributed
    from zeroforge.trainer.config import compose_config
    from zeroforge.trainer.engine import build_engine, train_step
    from zeroforge.trainer.faults import FaultGuard
    from zeroforge.trainer.host_memory import peak_rss_bytes, rss_bytes
    from zeroforge.trainer.partitioned import build_for_training
    from zeroforge.trainer.sequence_parallel import sequence_parallel
    from zeroforge.trainer.validate import validate

    env = distributed.dist_env()
    cfg = compose_config(
        [
            *WIDE,
            f"data.seq_len={seq_len}",
            f"model.max_position_embeddings={seq_len}",
            "train.micro_batch_size=1",
            "train.global_batch_size=1",
            "train.precision=fp32",
            "deepspeed=zero0",
            f"parallel.sequence={sequence}",
            *overrides,
        ]
    )
    topology = validate(cfg, env.world_size, cuda=False)
    distributed.init_distributed("cpu")
    torch.manual_seed(cfg.seed)
    model = build_for_training(
        model_config=cfg.model, optim=cfg.optim, deepspeed=cfg.deepspeed, topology=topology, vocab_size=4096, eos_id=None
    )
    slices = sequence_parallel(model, topology, cfg.deepspeed.stage)
    engine = build_engine(
        model, model_config=cfg.model, train=cfg.train, optim=cfg.optim, deepspeed=cfg.deepspeed, topology=topology, sequence=slices
    )
    guard = FaultGuard(cfg.train, engine.basic_optimizer, cfg.deepspeed.stage)
    tokens = torch.randint(0, 4096, (1, seq_len + 1), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in (1, 2):
        before = rss_bytes()
        started = time.perf_counter()
        with PeakSampler() as sampler:
            result = train_step(engine, [tokens], "cpu", False, guard, step, None, slices)
        losses.append(float(result.loss))
    seconds = time.perf_counter() - started
    distributed.close()
    if env.is_main:
        record = {"step_gib": (sampler.peak - before) / 2**30, "peak_gib": peak_rss_bytes() / 2**30, "seconds": seconds, "losses": losses}
        print(json.dumps(record))


def run_case(sequence: int, seq_len: int, overrides: list[str]) -> dict:
    launcher = (
        [sys.executable] if sequence == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    args = ["--worker", str(sequence), "--seq-len", str(seq_len), *overrides]
    out = subprocess.run([*launcher, __file__, *args], cwd=REPO, env=env, check=True, capture_output=True, text=True)
    return json.loads(next(line for line in reversed(out.stdout.splitlines()) if line.startswith("{")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--worker", type=int, help="run one case's rank with this parallel.sequence")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "long_context.json"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.seq_len, args.overrides)
        return
    from zeroforge.trainer.rundir import git_commit

    cases = {sequence: run_case(sequence, args.seq_len, args.overrides) for sequence in (1, 2)}
    print(f"seq_len {args.seq_len}, model tiny x {' '.join(WIDE)}")
    print(f"{'parallel.sequence':<19}{'ranks':>6}{'step GiB / rank':>17}{'peak GiB / rank':>17}{'step s':>8}  losses (warm-up, measured)")
    for sequence, r in cases.items():
        losses = ", ".join(f"{loss:.6f}" for loss in r["losses"])
        print(f"{sequence:<19}{sequence:>6}{r['step_gib']:>17.3f}{r['peak_gib']:>17.3f}{r['seconds']:>8.1f}  {losses}")
    ratio = cases[2]["step_gib"] / cases[1]["step_gib"]
    print(f"step memory per rank, parallel.sequence 2 / 1 = {ratio:.3f} (goal <= {GOAL}): {'met' if ratio <= GOAL else 'NOT met'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "seq_len": args.seq_len,
                "overrides": [*WIDE, *args.overrides],
                "cases": cases,
                "ratio": ratio,
                "commit": git_commit(),
                "cpus": os.cpu_count(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
