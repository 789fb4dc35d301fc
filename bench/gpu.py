"""GPU throughput: tokens/s and MFU on one GPU, bf16, llama-125m and llama-1b.

    python bench/gpu.py [--steps 40] [--models llama-125m llama-1b] [--overrides deepspeed=zero3 ...]
    python bench/gpu.py --sweep [--budget-s 420] [--seconds 8] [--models ...]
    python bench/gpu.py --sweep --dry-run [--gpu-memory-gb 80]

Default mode: `zeroforge train` per model at seq_len 2048 on the embedded corpus (tokenizer
vocabulary 32,000, so the output layer has a realistic share of the FLOPs), read back from its
metrics.jsonl; prints a table and writes bench/results/gpu.json.

--sweep: every throughput feature on and off, per model, in one process; no run starts after
--budget-s (made to end within 6 minutes, for one call of at most 8 on a lent GPU): the trainer's own build_engine and
train_step (ZeRO-2, bf16, seq_len 2048, vocabulary 32,000, global batch = micro batch) on random
tokens, at the largest power-of-two micro batch (up to --max-micro-batch) that launcher/plan.py
says fits that variant on this GPU. Variants: all features off (the setup measured before: plain
loss, unfused AdamW, eager), all on (chunked loss, fused AdamW, regional compile), and all on
but one; all on in fp8 (train.precision=fp8, tensorwise and rowwise) where torchao is installed;
flash_attention_2 and Liger only where installed. Each run: --warmup untimed steps
(compilation included), then steps for --seconds. Also checks, once per model, that sdpa runs
on its flash backend. Writes bench/results/gpu_sweep.json and a Markdown table beside it
(gpu_sweep.md); a run that does not fit, fails or finds the budget spent is recorded as such.
--dry-run prints the runs and their planned memory without a GPU (and without torch.cuda).
MFU uses the detected GPU's dense bf16 peak (trainer/metrics.py PEAK_TFLOPS), fp8 runs too (as
torchtitan reports them).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MICRO_BATCH = {"llama-125m": 16, "llama-1b": 8}
GIB = 2**30
DEVICE = "cuda"  # what the sweep measures on (a module constant so that a CPU smoke run can change it)

# The sweep's fixed setup; every variant adds its own overrides.
SWEEP_BASE = [
    "deepspeed=zero2",
    "train.precision=bf16",
    "data.seq_len=2048",
    "model.vocab_size=32000",
    "logging.wandb.mode=disabled",
    "eval.every=0",
    "checkpoint.every=0",
]
ALL_ON = {"train.loss": "chunked", "optim.fused": "true", "model.compile": "regional"}
ALL_OFF = {"train.loss": "plain", "optim.fused": "false", "model.compile": "off"}


def run(model: str, steps: int, log_every: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        args = [
            f"model={model}",
            "deepspeed=zero2",
            "train.precision=bf16",
            "data.seq_len=2048",
            "data.tokenizer_vocab_size=32000",
            f"train.micro_batch_size={MICRO_BATCH.get(model, 8)}",
            f"train.global_batch_size={MICRO_BATCH.get(model, 8)}",
            f"train.steps={steps}",
            f"logging.every={log_every}",
            "eval.every=0",
            "checkpoint.every=0",
            "logging.wandb.mode=disabled",
            f"run.dir={run_dir}",
            *overrides,
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


def sweep_variants(flash: bool, liger: bool, fp8: bool = False) -> list[tuple[str, dict[str, str]]]:
    """(name, overrides): off, all on, all on in fp8 (tensorwise: compared with all on), and all
    on with one feature turned back (then the extras, fp8 rowwise first)."""
    variants = [
        ("all off (before)", ALL_OFF),
        ("all on", ALL_ON),
    ]
    if fp8:
        variants.append(("all on + fp8 tensorwise", {**ALL_ON, "train.precision": "fp8"}))
    variants += [
        ("all on, loss plain", {**ALL_ON, "train.loss": "plain"}),
        ("all on, AdamW unfused", {**ALL_ON, "optim.fused": "false"}),
        ("all on, compile off", {**ALL_ON, "model.compile": "off"}),
    ]
    if fp8:
        variants.append(("all on + fp8 rowwise", {**ALL_ON, "train.precision": "fp8", "train.fp8_recipe": "rowwise"}))
    if flash:
        variants.append(("all on + flash_attention_2", {**ALL_ON, "model.attn_implementation": "flash_attention_2"}))
    if liger:
        # Last: Liger's RoPE patch is module-wide, so it would stay on for any run after it.
        variants.append(("all on + Liger kernels and loss", {**ALL_ON, "train.loss": "liger", "model.liger_kernels": "true"}))
    return variants


def _sweep_config(model: str, overrides: dict[str, str], gpu_memory_gb: float, micro: int, extra: list[str]):
    from zeroforge.trainer.config import compose_config

    return compose_config(
        [
            f"model={model}",
            *SWEEP_BASE,
            f"cluster.gpu_memory_gb={gpu_memory_gb}",
            f"train.micro_batch_size={micro}",
            f"train.global_batch_size={micro}",
            *[f"{k}={v}" for k, v in overrides.items()],
            *extra,
        ]
    )


def plan_runs(
    models: list[str], gpu_memory_gb: float, max_micro: int, flash: bool, liger: bool, extra: list[str], fp8: bool = False
) -> list[dict]:
    """Every run of the sweep with its micro batch and planned memory (no GPU needed)."""
    from zeroforge.launcher.estimate import Planner
    from zeroforge.trainer.validate import job_topology

    runs = []
    # Variant by variant across the models (off and on for every model first), so that a budget
    # that runs out loses ablations, not a model.
    for name, overrides in sweep_variants(flash, liger, fp8):
        for model in models:
            cfg = _sweep_config(model, overrides, gpu_memory_gb, max_micro, extra)
            best = Planner.of(cfg, job_topology(cfg)).best_micro_batch(limit=max_micro)
            runs.append(
                {
                    "model": model,
                    "variant": name,
                    "overrides": overrides,
                    "micro_batch": None if best is None else best[0],
                    "planned_gib": None if best is None else best[1].total / GIB,
                }
            )
    return runs


def _free_cuda() -> None:
    """Between runs: dynamo's caches forgotten too (they would hold the last model, and its guards
    would count towards torch's recompile limit); inductor's on-disk cache keeps recompiling cheap."""
    import torch
    import torch._dynamo

    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def _sdpa_flash_check(module, micro: int, vocab: int) -> str:
    """'yes' when the model's forward runs with sdpa restricted to its flash backend, else why not."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tokens = torch.randint(0, vocab, (micro, 2048), device=DEVICE)
    try:
        with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            module(input_ids=tokens)
        return "yes"
    except RuntimeError as err:
        return f"no ({str(err).splitlines()[0][:200]})"


def measure(run: dict, gpu_memory_gb: float, seconds: float, warmup: int, extra: list[str], check_flash: bool) -> dict:
    """One sweep run in this process: build, warm up (compile), then time steps for `seconds`."""
    import torch

    from zeroforge.trainer.engine import build_engine, train_step
    from zeroforge.trainer.faults import FaultGuard
    from zeroforge.trainer.metrics import mfu, peak_tflops
    from zeroforge.trainer.model import build_model, flops_per_token
    from zeroforge.trainer.validate import validate

    micro = run["micro_batch"]
    cfg = _sweep_config(run["model"], run["overrides"], gpu_memory_gb, micro, extra)
    topology = validate(cfg, 1)
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    try:
        with torch.device(DEVICE):  # initialised on the GPU: seconds, not a minute of CPU init per 1B run
            model = build_model(cfg.model, cfg.model.vocab_size)
    except (RuntimeError, NotImplementedError) as err:
        print(f"   building on the GPU failed ({err}); building on the CPU as the trainer does", flush=True)
        model = build_model(cfg.model, cfg.model.vocab_size)
    params = sum(p.numel() for p in model.parameters())
    fpt = flops_per_token(model.config, params, cfg.data.seq_len)
    engine = build_engine(model, model_config=cfg.model, train=cfg.train, optim=cfg.optim, deepspeed=cfg.deepspeed, topology=topology)
    guard = FaultGuard(cfg.train, engine.basic_optimizer, cfg.deepspeed.stage)
    result = dict(run)
    if check_flash:
        result["sdpa_flash"] = _sdpa_flash_check(engine.module, 1, cfg.model.vocab_size)
    generator = torch.Generator(device=DEVICE).manual_seed(0)

    def batch() -> list[torch.Tensor]:
        return [torch.randint(0, cfg.model.vocab_size, (micro, cfg.data.seq_len + 1), device=DEVICE, generator=generator)]

    torch.cuda.reset_peak_memory_stats()
    first_loss = None
    for step in range(1, warmup + 1):
        loss = train_step(engine, batch(), DEVICE, False, guard, step).loss
        first_loss = first_loss if first_loss is not None else loss
    torch.cuda.synchronize()
    warm = time.perf_counter()
    steps = 0
    while steps < 3 or time.perf_counter() - warm < seconds:
        steps += 1
        train_step(engine, batch(), DEVICE, False, guard, warmup + steps)
        if steps % 4 == 0:
            torch.cuda.synchronize()  # the clock sees finished work, not queued kernels
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - warm
    tokens_per_s = steps * micro * cfg.data.seq_len / elapsed
    result.update(
        {
            "params": params,
            "setup_and_warmup_s": warm - started,
            "timed_steps": steps,
            "step_time_s": elapsed / steps,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(fpt, tokens_per_s, 1, peak_tflops(None, DEVICE)),
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
            "first_loss": float(first_loss),
        }
    )
    engine.destroy()
    del engine, model, guard
    _free_cuda()
    return result


def run_sweep(args: argparse.Namespace) -> None:
    flash = importlib.util.find_spec("flash_attn") is not None
    liger = importlib.util.find_spec("liger_kernel") is not None
    fp8 = importlib.util.find_spec("torchao") is not None
    device = "no GPU (dry run)"
    gpu_memory_gb = args.gpu_memory_gb
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            sys.exit("--sweep needs a CUDA GPU (or --dry-run)")
        device = torch.cuda.get_device_name()
        gpu_memory_gb = gpu_memory_gb or torch.cuda.get_device_properties(0).total_memory / GIB
    gpu_memory_gb = round(gpu_memory_gb or 80.0, 1)
    runs = plan_runs(args.models, gpu_memory_gb, args.max_micro_batch, flash, liger, args.overrides, fp8)
    extras = [
        f"torchao {'installed' if fp8 else 'not installed: no fp8 runs'}",
        f"flash-attn {'installed' if flash else 'not installed: no flash_attention_2 run'}",
        f"liger-kernel {'installed' if liger else 'not installed: no Liger run'}",
    ]
    print(f"device: {device}, {gpu_memory_gb} GiB planned against; {'; '.join(extras)}", flush=True)
    if args.dry_run:
        print(f"{'model':<12}{'variant':<34}{'micro batch':>12}{'planned GiB':>13}")
        for r in runs:
            planned = "does not fit" if r["micro_batch"] is None else f"{r['planned_gib']:.1f}"
            print(f"{r['model']:<12}{r['variant']:<34}{r['micro_batch'] or '-':>12}{planned:>13}")
        _write(args.out, {"device": device, "gpu_memory_gb": gpu_memory_gb, "dry_run": True, "notes": extras, "runs": runs}, runs)
        return

    from zeroforge.trainer.distributed import init_distributed

    init_distributed("cuda")
    deadline = time.perf_counter() + args.budget_s
    results, checked = [], set()
    for r in runs:
        if r["micro_batch"] is None:
            results.append({**r, "error": "the planner says not even micro batch 1 fits"})
            continue
        if time.perf_counter() > deadline:
            results.append({**r, "error": f"not run: the sweep's budget of {args.budget_s} s was spent"})
            continue
        print(f"-- {r['model']} | {r['variant']} | micro batch {r['micro_batch']} (planned {r['planned_gib']:.1f} GiB)", flush=True)
        try:
            result = measure(r, gpu_memory_gb, args.seconds, args.warmup, args.overrides, check_flash=r["model"] not in checked)
            checked.add(r["model"])
        except Exception as err:  # an OOM or a kernel that fails is a result of the sweep, not its end
            import torch

            result = {**r, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}
            if isinstance(err, torch.cuda.OutOfMemoryError):
                result["error"] = f"out of memory at micro batch {r['micro_batch']} (planned {r['planned_gib']:.1f} GiB)"
        _free_cuda()  # outside the except: its traceback kept the failed run's tensors alive
        if "mfu" in result:
            print(
                f"   {result['tokens_per_s']:,.0f} tokens/s, MFU {_pct(result['mfu'])}, "
                f"{result['peak_allocated_gib']:.1f} GiB peak, warm-up {result['setup_and_warmup_s']:.0f} s",
                flush=True,
            )
        else:
            print(f"   {result['error']}", flush=True)
        results.append(result)
        _write(args.out, {"device": device, "gpu_memory_gb": gpu_memory_gb, "notes": extras, "runs": results}, results)
    print(Path(args.out).with_suffix(".md").read_text())


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _write(out: str, payload: dict, rows: list[dict]) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    lines = [
        f"device: {payload['device']} ({payload['gpu_memory_gb']} GiB); {'; '.join(payload['notes'])}",
        "",
        "| model | variant | micro batch | tokens/s | MFU | vs all off | peak allocated (planned) | step s | first loss |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = {r["model"]: r.get("tokens_per_s") for r in rows if r["variant"] == "all off (before)"}
    for r in rows:
        planned = "-" if r.get("planned_gib") is None else f"{r['planned_gib']:.1f}"
        if "tokens_per_s" not in r:
            note = r.get("error", "planned only")
            lines.append(f"| {r['model']} | {r['variant']} | {r['micro_batch'] or '-'} | {note} | | | ({planned} GiB) | | |")
            continue
        ratio = f"{r['tokens_per_s'] / base[r['model']]:.2f}x" if base.get(r["model"]) else "-"
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['micro_batch']} | {r['tokens_per_s']:,.0f} | {_pct(r['mfu'])} | {ratio} | "
            f"{r['peak_allocated_gib']:.1f} GiB ({planned}) | {r['step_time_s']:.3f} | {r['first_loss']:.4f} |"
        )
    flash = [f"{r['model']}: {r['sdpa_flash']}" for r in rows if "sdpa_flash" in r]
    if flash:
        lines += ["", "sdpa on its flash backend: " + "; ".join(flash)]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=["llama-125m", "llama-1b"])
    parser.add_argument("--overrides", nargs="*", default=[], help="more Hydra overrides for every run")
    parser.add_argument("--out", default=None, help="default: bench/results/gpu.json, or gpu_sweep.json with --sweep")
    parser.add_argument("--sweep", action="store_true", help="every feature on and off, per model (see above)")
    parser.add_argument("--dry-run", action="store_true", help="with --sweep: print the runs and their planned memory")
    parser.add_argument("--budget-s", type=float, default=300.0, help="--sweep starts no run after this many seconds")
    parser.add_argument("--seconds", type=float, default=6.0, help="--sweep: timed seconds per run, after the warm-up")
    parser.add_argument("--warmup", type=int, default=3, help="--sweep: untimed steps per run (compilation happens here)")
    parser.add_argument("--max-micro-batch", type=int, default=64)
    parser.add_argument("--gpu-memory-gb", type=float, default=None, help="--sweep: default the GPU's own (80 in a dry run)")
    args = parser.parse_args()
    if args.sweep:
        args.out = args.out or str(REPO / "bench" / "results" / "gpu_sweep.json")
        if args.dry_run:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        run_sweep(args)
        return

    import torch

    args.out = args.out or str(REPO / "bench" / "results" / "gpu.json")
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
