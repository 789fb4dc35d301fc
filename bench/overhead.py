"""Trainer overhead: tokens/s of zeroforge's loop against a bare DeepSpeed loop (and plain PyTorch
at one rank), on 1 and 2 ranks.

    python bench/overhead.py [--ranks 1 2] [--repeats 5] [--steps 160] [--warmup 10] [--slice 10] [--control] [overrides ...]

Each loop runs in its own processes (torchrun on gloo for 2 ranks) on the same model, batches,
sequence length and threads per rank (the machine's cores shared by the ranks). The trainer is
the real `zeroforge train`, read back from its metrics.jsonl, so it pays for everything a run
does at every step: the agreed stop flag (an all-reduce), the fault guard, the metrics, the
checkpointer's and validator's cadence checks. The bare loop is DeepSpeed's engine with the
trainer's model, loss, optimizer, generated config and data loader (its batches drawn inside the
timed step, as the trainer's are), and nothing else.

A loop's speed is the 90th percentile of the tokens/s of its windows of logging.every steps after
the warm-up: the trainer's logging intervals (at the config's logging.every, so it pays for
logging, the loss all-reduce and the straggler exchange, as often as a run does), and the same
steps of the bare loops, timed step by step and summed. The fast windows are the ones no pause
cut into (below) and a stretch in which the shared machine ran slow did not reach, while every
window, fast or not, pays the loop's own per-step work.

The loops of one rank count run interleaved (`interleaved`): all start at once, but only one runs
at a time, in turns of --slice seconds, the others stopped with SIGSTOP (their whole process
trees). Run one after another, the loops met this VM's speed minutes apart, and it drifts by 15%
over such stretches: five rounds' ratios spread from 0.75 to 1.18, ten times the goal's 3%.
Interleaved, each loop meets the machine within seconds of the others; a window that a turn cuts
in two is slow and falls below the 90th percentile. Each round (--repeats) starts a different
loop first; a round's trainer is divided by the same round's bare DeepSpeed, and the table shows
the median of those ratios (every round is in the JSON). Prints a table and writes
bench/results/overhead.json. Goal: trainer >= 0.97 x bare DeepSpeed at every rank count.
--control runs the bare DeepSpeed loop a second time in every round, in processes of its own: its
ratio to the first is how far two runs of the same loop differ, the spread within which this
machine cannot tell two loops apart.

At 2 ranks it then prices the hang watchdog and straggler timing (watch_cost): the collectives the
Flight Recorder notes each step, times what it adds to one, plus one straggler exchange per
logging interval, as a share of the bare loop's step. Goal: below 1% at the default logging.every.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The same global batch on every rank count (grad accumulation 2 on one rank, 1 on two).
BASE = ["train.micro_batch_size=8", "train.global_batch_size=16"]
# --control's loop: the bare DeepSpeed loop again, in processes of its own.
BARE_LOOP = {"control": "deepspeed"}
# Steps of the bare loop that the watchdog's cost is priced on.
WATCH_STEPS = 60
GOAL = 0.97
# The hang watchdog's and straggler timing's cost per step, as a share of a step (2 ranks).
WATCH_GOAL = 0.01
TINY_COLLECTIVES = 2000
EXCHANGES = 20


def fast_windows(tokens_per_s: list[float]) -> float:
    """The 90th percentile of the windows' tokens/s."""
    return statistics.quantiles(tokens_per_s, n=10)[-1]


def windows(seconds: list[float], tokens_per_step: int, every: int) -> list[float]:
    """The tokens/s of each whole window of `every` steps (the trainer's logging.every), from the steps' seconds."""
    return [every * tokens_per_step / sum(seconds[i : i + every]) for i in range(0, len(seconds) - every + 1, every)]


def _launcher(ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]


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


def worker(kind: str, overrides: list[str], steps: int, warmup: int) -> None:
    """One bare loop on this process's rank; rank 0 prints the tokens/s of all ranks at the 90th percentile
    window after warmup."""
    import torch

    from zeroforge.data.loader import BatchLoader
    from zeroforge.data.prepare import prepare
    from zeroforge.data.shards import TokenStore
    from zeroforge.trainer import distributed
    from zeroforge.trainer.config import compose_config
    from zeroforge.trainer.engine import causal_lm_loss, fused_adamw, param_groups
    from zeroforge.trainer.validate import validate

    env = distributed.dist_env()
    cfg = compose_config(overrides)
    topology = validate(cfg, env.world_size, cuda=False)
    loader = BatchLoader(
        TokenStore(prepare(cfg.data), "train"),
        cfg.data.seq_len,
        cfg.seed,
        cfg.train.global_batch_size,
        cfg.train.micro_batch_size,
        dp_rank=env.rank,
        dp_size=topology.dp_size,
    )
    model = _model(cfg)
    o = cfg.optim
    # torch's AdamW as the trainer builds it (its SkippableAdamW only adds a flag), fused or not alike.
    opt = torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=(o.betas[0], o.betas[1]), eps=o.eps, fused=fused_adamw(o, topology)
    )
    if kind in ("deepspeed", "watch", "unwatched"):
        import deepspeed

        from zeroforge.trainer.deepspeed_config import deepspeed_config
        from zeroforge.trainer.watchdog import enable_flight_recorder

        if kind == "watch":
            enable_flight_recorder()  # as train() does; "unwatched" and "deepspeed" record nothing
        distributed.init_distributed("cpu")
        config = deepspeed_config(optim=cfg.optim, deepspeed=cfg.deepspeed, topology=topology)
        model, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)

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
    seconds = []
    recorded = []  # collectives the Flight Recorder had noted as the timed steps began, and ended
    for i in range(steps):
        if i == warmup and kind == "watch":
            recorded.append(_recorded())
        start = time.perf_counter()
        # Drawn inside the step, as the trainer draws its batches (its steps pay for the loader).
        step([b.to(torch.long) for b in loader.next_batch()])
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    if kind in ("watch", "unwatched"):
        per_step = (_recorded() - recorded[0]) / len(seconds) if recorded else 0.0
        watch_costs(kind, seconds, per_step, env)
        return
    distributed.close()
    if env.is_main:
        print(json.dumps({"tokens_per_s": fast_windows(windows(seconds, topology.tokens_per_step, cfg.logging.every))}))


def _recorded() -> int:
    import pickle

    from torch._C._distributed_c10d import _dump_fr_trace

    entries = pickle.loads(_dump_fr_trace(True, False, False)).get("entries", [])
    return entries[-1]["record_id"] + 1 if entries else 0


def watch_costs(kind: str, seconds: list[float], collectives_per_step: float, env) -> None:
    """After the bare DeepSpeed loop, with (watch) or without (unwatched) torch's Flight Recorder:
    the median step, a tiny all-reduce (whose difference between the two is what the recorder adds
    to each collective), and, with it, the collectives a step makes and one straggler exchange."""
    import torch
    import torch.distributed as dist

    from zeroforge.trainer import distributed
    from zeroforge.trainer.stragglers import StragglerWatch

    info = distributed.DistInfo(rank=env.rank, world_size=env.world_size, local_rank=env.local_rank)
    one = torch.zeros(1)
    tiny = []
    for _ in range(TINY_COLLECTIVES):
        start = time.perf_counter()
        dist.all_reduce(one)
        tiny.append(time.perf_counter() - start)
    result = {"step_s": statistics.median(seconds), "tiny_all_reduce_s": statistics.median(tiny)}
    if kind == "watch":
        watch = StragglerWatch(info, factor=1.5, intervals=3, hosts=["bench"] * env.world_size)
        exchanges = []
        for _ in range(EXCHANGES):
            start = time.perf_counter()
            watch.interval(sum(seconds), 0.0, [])
            exchanges.append(time.perf_counter() - start)
        result["exchange_s"] = statistics.median(exchanges)
        result["collectives_per_step"] = collectives_per_step
    distributed.close()
    if env.is_main:
        print(json.dumps(result))


def _tree(process: subprocess.Popen) -> list:
    import psutil

    try:
        root = psutil.Process(process.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _signal(process: subprocess.Popen, sig: int) -> None:
    import psutil

    for p in _tree(process):
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def interleaved(jobs: dict[str, tuple[list[str], dict]], slice_s: float, log_dir: Path) -> dict[str, str]:
    """Runs every job (name: command, environment) at once, one at a time: each in turn continues
    for `slice_s` seconds while the others are stopped. Returns each job's stdout; a failed job
    raises with its output."""
    import signal

    processes = {}
    for name, (cmd, env) in jobs.items():
        with open(log_dir / f"{name}.log", "w") as out:
            # A session of its own: the kernel hangs up a stopped process group that the exit of
            # the shell above this bench orphans.
            processes[name] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        _signal(processes[name], signal.SIGSTOP)
    try:
        while any(p.poll() is None for p in processes.values()):
            for process in processes.values():
                if process.poll() is not None:
                    continue
                _signal(process, signal.SIGCONT)
                try:
                    process.wait(timeout=slice_s)
                except subprocess.TimeoutExpired:
                    _signal(process, signal.SIGSTOP)
    finally:
        for process in processes.values():
            if process.poll() is None:
                _signal(process, signal.SIGKILL)
    outputs = {name: (log_dir / f"{name}.log").read_text() for name in jobs}
    for name, process in processes.items():
        if process.returncode != 0:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{outputs[name][-3000:]}")
    return outputs


def bare_command(kind: str, ranks: int, overrides: list[str], steps: int, warmup: int) -> list[str]:
    return [*_launcher(ranks), __file__, "--worker", kind, "--steps", str(steps), "--warmup", str(warmup), *overrides]


def bare_tokens_per_s(output: str) -> float:
    return json.loads(next(line for line in reversed(output.splitlines()) if line.startswith("{")))["tokens_per_s"]


def trainer_command(ranks: int, overrides: list[str], steps: int, run_dir: Path) -> list[str]:
    args = [
        *overrides,
        f"run.dir={run_dir}",
        f"train.steps={steps}",
        "logging.wandb.mode=disabled",
        "eval.every=0",
        "checkpoint.every=0",
    ]
    return [*_launcher(ranks), "-m", "zeroforge.trainer.train", *args]


def trainer_tokens_per_s(run_dir: Path, warmup: int, every: int) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # The logging intervals that began after the warm-up (not the record of step 1).
    return fast_windows([r["tokens_per_s"] for r in records if "loss" in r and r["step"] % every == 0 and r["step"] - every >= warmup])


def one_round(ranks: int, kinds: list[str], overrides: list[str], every: int, args: argparse.Namespace) -> dict[str, float]:
    """The loops of one rank count, interleaved; `kinds` in the order of their first turns."""
    threads = max(1, (os.cpu_count() or 1) // ranks)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        jobs = {
            kind: (
                trainer_command(ranks, overrides, args.steps, run_dir)
                if kind == "trainer"
                else bare_command(BARE_LOOP.get(kind, kind), ranks, overrides, args.steps, args.warmup),
                env,
            )
            for kind in kinds
        }
        outputs = interleaved(jobs, args.slice, Path(tmp))
        return {
            f"{ranks}:{kind}": trainer_tokens_per_s(run_dir, args.warmup, every) if kind == "trainer" else bare_tokens_per_s(outputs[kind])
            for kind in kinds
        }


def watch_cost(overrides: list[str], every: int, args: argparse.Namespace) -> dict:
    """The hang watchdog's and straggler timing's cost per step on 2 ranks: what the Flight Recorder
    adds to each collective (a tiny all-reduce with it, less one without, the two in turns, round
    after round) times the collectives of a step, plus one straggler exchange per logging interval."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 2)), "DS_ACCELERATOR": "cpu"}
    rounds = []
    for i in range(args.repeats):
        measured = {}
        for kind in ("watch", "unwatched")[i % 2 :] + ("watch", "unwatched")[: i % 2]:
            cmd = [*_launcher(2), __file__, "--worker", kind, "--steps", str(WATCH_STEPS), "--warmup", str(args.warmup), *overrides]
            out = subprocess.run(
                cmd,
                cwd=REPO,
                env={**env, **({} if kind == "watch" else {"TORCH_FR_BUFFER_SIZE": "0"})},
                check=True,
                capture_output=True,
                text=True,
            )
            measured[kind] = json.loads(next(line for line in reversed(out.stdout.splitlines()) if line.startswith("{")))
        rounds.append(measured)
    recorder_s = statistics.median(r["watch"]["tiny_all_reduce_s"] - r["unwatched"]["tiny_all_reduce_s"] for r in rounds)
    step_s = statistics.median(r["watch"]["step_s"] for r in rounds)
    collectives = statistics.median(r["watch"]["collectives_per_step"] for r in rounds)
    exchange_s = statistics.median(r["watch"]["exchange_s"] for r in rounds)
    result = {
        "recorder_s_per_collective": recorder_s,
        "collectives_per_step": collectives,
        "exchange_s": exchange_s,
        "step_s": step_s,
        "rounds": rounds,
    }
    print(f"\nhang watchdog and straggler timing, 2 ranks (median of {args.repeats} rounds):")
    print(f"  Flight Recorder: {recorder_s * 1e6:+.1f} us per collective x {collectives:.0f} collectives a step")
    print(f"  straggler exchange: {exchange_s * 1e3:.2f} ms per logging interval; a step: {step_s * 1e3:.1f} ms")
    for interval in sorted({every, 1}, reverse=True):
        share = (max(0.0, recorder_s) * collectives + exchange_s / interval) / step_s
        result[f"share_at_logging_every_{interval}"] = share
        print(f"  logging.every={interval}: {share:.2%} of a step (goal < {WATCH_GOAL:.0%}): {'met' if share < WATCH_GOAL else 'NOT met'}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each loop runs once a round")
    parser.add_argument(
        "--control", action="store_true", help="also run the bare DeepSpeed loop a second time: its ratio is the spread the bench resolves"
    )
    parser.add_argument("--slice", type=float, default=10.0, help="seconds a loop runs in its turn while the others are stopped")
    parser.add_argument("--worker", choices=["deepspeed", "pytorch", "watch", "unwatched"])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "overhead.json"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.overrides, args.steps, args.warmup)
        return
    from zeroforge.trainer.config import compose_config

    overrides = [*BASE, *args.overrides]
    every = compose_config(overrides).logging.every
    if args.warmup % every:
        parser.error(f"--warmup must be a multiple of logging.every={every} (the trainer's logging intervals), found {args.warmup}")

    extra = ["control"] if args.control else []
    cases = [(ranks, kind) for ranks in args.ranks for kind in ("trainer", "deepspeed", *(["pytorch"] if ranks == 1 else []), *extra)]
    rounds: list[dict[str, float]] = []
    for i in range(args.repeats):
        measured = {}
        for ranks in args.ranks:
            kinds = [kind for r, kind in cases if r == ranks]
            # Each round another loop takes the first turn.
            measured.update(one_round(ranks, kinds[i % len(kinds) :] + kinds[: i % len(kinds)], overrides, every, args))
        rounds.append(measured)

    print(f"{'ranks':<7}{'loop':<11}{'p90 tokens/s':>17}{'median ratio to bare DeepSpeed':>32}")
    summary = {}
    for ranks, kind in cases:
        ratios = [r[f"{ranks}:{kind}"] / r[f"{ranks}:deepspeed"] for r in rounds]
        summary[f"{ranks}:{kind}"] = {
            "tokens_per_s": statistics.median(r[f"{ranks}:{kind}"] for r in rounds),
            "round_ratios": ratios,
            "vs_deepspeed": statistics.median(ratios),
        }
        print(f"{ranks:<7}{kind:<11}{summary[f'{ranks}:{kind}']['tokens_per_s']:>17.0f}{summary[f'{ranks}:{kind}']['vs_deepspeed']:>32.3f}")
    for ranks in args.ranks:
        ratio = summary[f"{ranks}:trainer"]["vs_deepspeed"]
        print(f"{ranks} rank(s): trainer / bare DeepSpeed = {ratio:.3f} (goal >= {GOAL}): {'met' if ratio >= GOAL else 'NOT met'}")
    watch = watch_cost(overrides, every, args) if 2 in args.ranks else None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "cpus": os.cpu_count(),
                "steps": args.steps,
                "warmup": args.warmup,
                "slice_s": args.slice,
                "overrides": overrides,
                "summary": summary,
                "rounds": rounds,
                "watch": watch,
                "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
