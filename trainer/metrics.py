"""Metrics: throughput, step and data-wait time, MFU, stragglers (trainer/stragglers.py), and the sinks (console, metrics.jsonl,
wandb, a progress line) that rank 0 writes."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Literal, Optional, cast

import torch

from zeroforge.trainer.config import LoggingConfig, RunSection
from zeroforge.trainer.distributed import DistInfo, all_reduce_mean
from zeroforge.trainer.host_memory import peak_rss_bytes
from zeroforge.trainer.log import SAME_ON_EVERY_RANK
from zeroforge.trainer.progress import open_progress
from zeroforge.trainer.routing import ExpertLoad
from zeroforge.trainer.stragglers import StragglerWatch
from zeroforge.trainer.topology import Topology

log = logging.getLogger("zeroforge")

# Dense bf16 peak TFLOP/s per accelerator, matched against torch.cuda.get_device_name().
# The H100 SXM reports itself as e.g. "NVIDIA H100 80GB HBM3"; GH200 carries an H100-class GPU.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "B200": 2250.0, "A100": 312.0}


def peak_for_device(name: str) -> Optional[float]:
    for key, value in PEAK_TFLOPS.items():  # the most specific names first
        if key in name:
            return value
    return None


def peak_tflops(configured: Optional[float], device: str) -> Optional[float]:
    if configured is not None:
        return configured
    if device != "cuda":
        return None
    return peak_for_device(torch.cuda.get_device_name())


def mfu(flops_per_token: float, tokens_per_s: float, world_size: int, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak of all accelerators."""
    if peak is None:
        return None
    return flops_per_token * tokens_per_s / (peak * 1e12 * world_size)


class Stopwatch:
    """Seconds spent inside `with stopwatch:` blocks, summed until the next lap(); `windows` holds
    when (wall-clock ns, as torch's Flight Recorder notes collectives) each block ran."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.seconds = 0.0
        self.windows: list[tuple[int, int]] = []
        self._started = 0.0
        self._started_ns = 0

    def __enter__(self) -> "Stopwatch":
        self._started, self._started_ns = self.clock(), time.time_ns()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds += self.clock() - self._started
        self.windows.append((self._started_ns, time.time_ns()))

    def lap(self) -> float:
        seconds, self.seconds, self.windows = self.seconds, 0.0, []
        return seconds


def timing(tokens: int, seconds: float, steps: int, data_wait_s: float, world_size: int) -> dict[str, float]:
    """The timing fields of a record: `steps` optimizer steps took `seconds` (evaluation and
    checkpoints left out) for `tokens` tokens on all ranks, `data_wait_s` of it in next_batch()."""
    tokens_per_s = tokens / seconds
    return {
        "tokens_per_s": tokens_per_s,  # all ranks together
        "tokens_per_s_per_gpu": tokens_per_s / world_size,
        "step_time_s": seconds / steps,
        "data_wait_s": data_wait_s,
        "data_wait_share": data_wait_s / seconds,
    }


def peak_memory_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    return peak_rss_bytes() / 1e9  # on the CPU: the process's peak resident memory


def _wandb_mode(mode: str) -> Literal["online", "offline", "disabled"]:
    if mode != "auto":
        return cast(Literal["online", "offline", "disabled"], mode)  # logging.wandb.mode's choices
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    netrc = Path.home() / ".netrc"
    has_login = netrc.exists() and "api.wandb.ai" in netrc.read_text()
    return "online" if has_key or has_login else "offline"


def _set_aside_records_after(path: Path, step: int) -> None:
    """A resumed run recomputes the steps after its checkpoint: their old records move to
    <name>.superseded.jsonl, so each step appears once in <name>.jsonl and no line is lost.

    A line that is not a record (cut off by a kill mid-write, or garbage) has no step to keep it
    by: it moves there too, with a warning, so <name>.jsonl stays readable and no resume fails on it.
    """
    # Split at "\n" only and bytes kept as they are (even invalid UTF-8), so every line is moved intact.
    with open(path, newline="\n", errors="surrogateescape") as f:
        lines = list(f)
    keep: list[str] = []
    aside: list[str] = []
    for number, line in enumerate(lines, 1):
        record_step = _record_step(line)
        if record_step is None:
            log.warning("%s line %d is not a JSON record with a step (%r); moved to the superseded records", path, number, line[:80])
        if record_step is not None and record_step <= step:
            keep.append(line)
        else:
            aside.append(line if line.endswith("\n") else line + "\n")
    if not aside:
        return
    with open(path.with_name(path.stem + ".superseded.jsonl"), "a", errors="surrogateescape") as f:
        f.writelines(aside)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep), errors="surrogateescape")
    tmp.replace(path)


def _record_step(line: str) -> Optional[int]:
    """The step of a whole JSON record line; None for anything else (a line without its newline
    was cut off by a kill, even where what was written parses)."""
    if not line.endswith("\n"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


class _Sinks:
    """Where records go on rank 0; other ranks get none, so callers never test for the rank."""

    def __init__(self, cfg: LoggingConfig, run: RunSection, run_config: dict[str, Any], start_step: int):
        """run_config: the whole resolved config, recorded with the wandb run."""
        run_dir = Path(run.dir)
        path = run_dir / "metrics.jsonl"
        if path.exists():
            _set_aside_records_after(path, start_step)
        self.jsonl = open(path, "a", buffering=1)
        self.samples_path = run_dir / "samples.jsonl"
        if self.samples_path.exists():
            _set_aside_records_after(self.samples_path, start_step)
        self.wandb = None
        mode = _wandb_mode(cfg.wandb.mode)
        self.online = mode == "online"
        if mode != "disabled":
            import wandb

            # The run id is kept in the run directory, so a restarted run continues the same
            # wandb run rather than starting a new one.
            id_file = run_dir / "wandb_id"
            if not id_file.exists():
                id_file.write_text(uuid.uuid4().hex[:12])
            self.wandb = wandb.init(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity,
                name=run.name,
                id=id_file.read_text().strip(),
                resume="allow",
                dir=str(run_dir),
                mode=mode,
                config=run_config,
            )

    def write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            # Lists (each MoE layer's expert shares) stay in metrics.jsonl; wandb plots the scalars.
            scalars = {k: v for k, v in record.items() if k != "step" and v is not None and not isinstance(v, list)}
            self.wandb.log(scalars, step=record["step"])

    def alert(self, title: str, text: str) -> None:
        """A wandb alert (e-mail, Slack) where the run is online; offline runs have none to send."""
        if self.wandb is not None and self.online:
            from wandb.sdk.wandb_alerts import AlertLevel

            self.wandb.alert(title=title, text=text, level=AlertLevel.WARN)

    def write_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        records = [{"step": step, **row} for row in rows]
        with open(self.samples_path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        if self.wandb is not None:
            import wandb

            # One table of every step so far (read back, so it survives a resume): the latest
            # table on the dashboard shows the text improving.
            table = [json.loads(line) for line in self.samples_path.read_text().splitlines()]
            columns: list[str | int] = ["step", "prompt", "text"]
            self.wandb.log({"samples": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in table])}, step=step)

    def close(self) -> None:
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


class MetricsLogger:
    """Called by every rank at every step; reduces across ranks on logging steps only.

    Logs the first step, every `logging.every` steps and the last; the logged loss is the mean
    over the steps since the previous record (as Megatron-LM reports it), so it is not one noisy batch.
    """

    def __init__(
        self,
        cfg: LoggingConfig,
        *,
        run: RunSection,
        run_config: dict[str, Any],
        steps: int,
        peak: Optional[float],
        dist: DistInfo,
        topology: Topology,
        flops_per_token: float,
        stragglers: StragglerWatch,
        start_step: int = 0,
        start_tokens: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ):
        """steps: train.steps; peak: cluster.peak_tflops (None: detected from the GPU, if any);
        clock: the seconds every timing reads (a test's own clock gives exact figures)."""
        self.every = cfg.every
        self.last_step = steps
        self.world_size = dist.world_size
        self.device = topology.device
        self.flops_per_token = flops_per_token
        self.tokens_per_step = topology.tokens_per_step
        self.peak = peak_tflops(peak, topology.device)
        self.sinks = _Sinks(cfg, run, run_config, start_step) if dist.is_main else None
        self.stragglers = stragglers
        self.progress = open_progress(dist.rank, steps, start_step)
        self.tokens = start_tokens
        # train() times loader.next_batch() with it: `with metrics.data_wait: batch = ...`.
        self.data_wait = Stopwatch(clock)
        # Time inside `with metrics.paused:` (evaluation, checkpoints) is left out of the throughput.
        self.paused = Stopwatch(clock)
        self.clock = clock
        self._last_time = clock()
        self._last_tokens = start_tokens
        self._last_step = start_step
        self._tokens_per_s: Optional[float] = None
        self._loss_sum: Optional[torch.Tensor] = None
        self._loss_steps = 0
        self._aux_sum: Optional[torch.Tensor] = None
        self.experts = ExpertLoad(cfg.dead_expert_intervals)

    def logs_at(self, step: int) -> bool:
        return step == 1 or step % self.every == 0 or step == self.last_step

    def step(
        self,
        step: int,
        loss: Optional[torch.Tensor],
        grad_norm: Optional[torch.Tensor],
        lr: float,
        skipped_steps: int = 0,
        aux_loss: Optional[torch.Tensor] = None,
        expert_tokens: Optional[torch.Tensor] = None,
    ) -> Optional[dict]:
        """loss: None for a skipped step, whose loss (perhaps not finite) stays out of the mean (and
        so does its load-balancing loss); expert_tokens: a mixture of experts' [layers, experts]."""
        self.tokens += self.tokens_per_step
        if loss is not None:
            self._loss_sum = loss.detach() if self._loss_sum is None else self._loss_sum + loss.detach()
            self._loss_steps += 1
            if aux_loss is not None:
                self._aux_sum = aux_loss.detach() if self._aux_sum is None else self._aux_sum + aux_loss.detach()
        if expert_tokens is not None:
            self.experts.add(expert_tokens)
        if not self.logs_at(step):
            self.progress.update(step, self._tokens_per_s)
            return None
        # Skips are agreed across ranks, so every rank takes part in this reduction or none does.
        loss_value = all_reduce_mean(self._loss_sum / self._loss_steps).item() if self._loss_sum is not None else None
        norm_value = None if grad_norm is None else float(grad_norm)
        aux_value = all_reduce_mean(self._aux_sum / self._loss_steps).item() if self._aux_sum is not None else None
        self._loss_sum, self._aux_sum, self._loss_steps = None, None, 0
        routing, dead = self.experts.interval()
        now = self.clock()
        paused = self.paused.windows
        seconds = now - self._last_time - self.paused.lap()
        ranks = self.stragglers.interval(seconds, self.data_wait.lap(), paused)
        # The slowest rank's data wait is the one that holds every rank back at the next collective.
        times = timing(self.tokens - self._last_tokens, seconds, step - self._last_step, ranks.pop("data_wait_s"), self.world_size)
        self._last_time, self._last_tokens, self._last_step = now, self.tokens, step
        self._tokens_per_s = times["tokens_per_s"]
        record = {
            "step": step,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": norm_value,
            "tokens": self.tokens,
            **times,
            "mfu": mfu(self.flops_per_token, times["tokens_per_s"], self.world_size, self.peak),
            "mem_gb": peak_memory_gb(self.device),
            "skipped_steps": skipped_steps,
            **ranks,
            **({} if aux_value is None else {"aux_loss": aux_value}),
            **routing,
        }
        self.write(record)
        for dead_expert in dead:
            log.warning("step %d: %s", step, dead_expert, extra=SAME_ON_EVERY_RANK)
        warning = self.stragglers.warning(record)
        if warning is not None:
            log.warning("step %d: %s", step, warning)
            if self.sinks is not None:
                self.sinks.alert("zeroforge straggler", warning)
        log.info(
            "step %d | loss %s | lr %.2e | grad_norm %s | %.0f tokens/s (%.0f per GPU) | %.3f s/step, %.0f%% waiting for data"
            " | mfu %s | mem %.2f GB",
            step,
            "skipped" if loss_value is None else f"{loss_value:.4f}",
            lr,
            "n/a" if norm_value is None else f"{norm_value:.3f}",
            times["tokens_per_s"],
            times["tokens_per_s_per_gpu"],
            times["step_time_s"],
            100 * times["data_wait_share"],
            "n/a" if record["mfu"] is None else f"{record['mfu']:.1%}",
            record["mem_gb"],
        )
        self.progress.update(step, self._tokens_per_s)
        return record

    def write(self, record: dict[str, Any]) -> None:
        if self.sinks is not None:
            self.sinks.write(record)

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Sanity generations (prompt, text) to samples.jsonl and a wandb table."""
        if self.sinks is not None:
            self.sinks.write_samples(step, rows)

    def close(self) -> None:
        self.progress.close()
        if self.sinks is not None:
            self.sinks.close()
