"""`zeroforge report run.dir=<dir>`: a run's curves as <dir>/report.png and a short summary.

Reads `metrics.jsonl` as the trainer writes it, so it works on a run that is still training: a
last line cut off mid-write is left out.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from zeroforge.trainer.config import ConfigError
from zeroforge.trainer.entry import entry_point


@dataclass(frozen=True)
class Summary:
    last_step: int
    last_loss: float
    best_val_loss: Optional[float]
    best_val_step: Optional[int]
    mean_tokens_per_s: Optional[float]
    mean_mfu: Optional[float]
    peak_mem_gb: Optional[float]

    def __str__(self) -> str:
        val = "n/a" if self.best_val_loss is None else f"{self.best_val_loss:.4f} (step {self.best_val_step})"
        tps = "n/a" if self.mean_tokens_per_s is None else f"{self.mean_tokens_per_s:,.0f}"
        mfu = "n/a" if self.mean_mfu is None else f"{self.mean_mfu:.1%}"
        mem = "n/a" if self.peak_mem_gb is None else f"{self.peak_mem_gb:.2f} GB"
        return (
            f"last step {self.last_step} | last loss {self.last_loss:.4f} | best val loss {val} | "
            f"mean tokens/s {tps} | mean MFU {mfu} | peak memory {mem}"
        )


def read_records(path: Path) -> list[dict]:
    """Every complete record; a torn last line (a writer mid-line, or killed) is skipped."""
    if not path.exists():
        raise ConfigError(f"{path} does not exist; expected run.dir to name a run directory that has started training")
    lines = path.read_text().splitlines(keepends=True)
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):
                break
            raise ConfigError(f"{path} line {number} is not a JSON record: {line[:80]!r}") from None
    return records


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def summarize(train: list[dict], val: list[dict]) -> Summary:
    # The first record's throughput includes start-up (compilation, first allocations): left out
    # of the mean when there are others.
    steady = train[1:] if len(train) > 1 else train
    best = min(val, key=lambda r: r["val_loss"]) if val else None
    mems = [r["mem_gb"] for r in train if r.get("mem_gb") is not None]
    return Summary(
        last_step=train[-1]["step"],
        last_loss=train[-1]["loss"],
        best_val_loss=None if best is None else best["val_loss"],
        best_val_step=None if best is None else best["step"],
        mean_tokens_per_s=_mean([r["tokens_per_s"] for r in steady if r.get("tokens_per_s") is not None]),
        mean_mfu=_mean([r["mfu"] for r in steady if r.get("mfu") is not None]),
        peak_mem_gb=max(mems) if mems else None,
    )


def plot(train: list[dict], val: list[dict], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a login node or in CI
    import matplotlib.pyplot as plt

    panels = [
        ("loss", "loss"),
        ("lr", "learning rate"),
        ("grad_norm", "gradient norm"),
        ("tokens_per_s", "tokens/s"),
        ("mfu", "MFU"),
        ("mem_gb", "peak memory (GB)"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (key, label) in zip(axes.flat, panels):
        points = [(r["step"], r[key]) for r in train if r.get(key) is not None and math.isfinite(r[key])]
        if points:
            ax.plot(*zip(*points), label="train" if key == "loss" else None)
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
        if key == "loss" and val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
            ax.legend()
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    # Written aside and renamed, so a viewer refreshing the file never reads half a PNG.
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)


def report(cfg: DictConfig) -> Path:
    """Write <run.dir>/report.png from <run.dir>/metrics.jsonl, print the summary, return the PNG path."""
    run_dir = Path(cfg.run.dir)
    records = read_records(run_dir / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    if not train:
        raise ConfigError(f"{run_dir / 'metrics.jsonl'} holds no training record yet; expected one per logged step")
    summary = summarize(train, val)
    out = run_dir / "report.png"
    plot(train, val, f"{run_dir.name}: step {summary.last_step}", out)
    print(summary, flush=True)
    print(f"curves: {out}", flush=True)
    return out


@entry_point
def main(cfg: DictConfig) -> None:
    report(cfg)


if __name__ == "__main__":
    main()
