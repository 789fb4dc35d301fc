"""Shared test set-up: CPU DeepSpeed, no wandb, one prepared copy of the embedded corpus."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Two ranks share two cores in the multi-rank tests; more threads per rank only thrash.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """The embedded corpus, prepared once for the whole session (every test shares the cache)."""
    from zeroforge.data.prepare import prepare
    from zeroforge.trainer.config import compose_config

    cache = tmp_path_factory.mktemp("data-cache")
    prepare(compose_config([f"data.cache_dir={cache}"]).data)
    return cache


@pytest.fixture
def smoke_overrides(data_cache: Path, tmp_path: Path) -> list[str]:
    return [
        "experiment=smoke",
        f"data.cache_dir={data_cache}",
        f"run.dir={tmp_path / 'run'}",
        "logging.wandb.mode=disabled",
    ]


def run_module(
    module: str,
    args: Sequence[str],
    cwd: Path,
    timeout: float = 600,
    launcher: Sequence[str] = (),
    env: Optional[dict[str, str]] = None,
) -> subprocess.CompletedProcess:
    """Run a real entry point (`python -m module`, or through `launcher`, e.g. torchrun)."""
    cmd = list(launcher) if launcher else [sys.executable]
    cmd += ["-m", module, *args]
    env = os.environ.copy() if env is None else env
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def exact_overrides(data_cache: Path, run_dir: Path, stage: int) -> list[str]:
    """20 logged fp32 steps of the smoke run: the reference for runs that must match exactly."""
    return [
        "experiment=smoke", f"data.cache_dir={data_cache}", "logging.wandb.mode=disabled", f"run.dir={run_dir}",
        f"deepspeed=zero{stage}", "train.precision=fp32", "eval.every=0", "checkpoint.every=0",
        "logging.every=1", "train.steps=20",
    ]


@pytest.fixture(scope="session")
def single_process_run(data_cache: Path, tmp_path_factory) -> Path:
    """`zeroforge train` in one process without ZeRO: what every variant is compared to."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    result = run_module("zeroforge.trainer.train", exact_overrides(data_cache, run_dir, 0), cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def process_group():
    """A one-rank process group in the test process, for in-process engines. One per session:
    DeepSpeed keeps the groups made on the first. Its port is taken out of the environment at
    once, or later subprocesses would inherit a port that is in use (RANK=0, WORLD_SIZE=1 and
    LOCAL_RANK=0, which DeepSpeed's engines read, say the same as a lone process)."""
    from zeroforge.trainer import distributed

    port = os.environ.get("MASTER_PORT")
    info = distributed.init_distributed("cpu")
    if port is None:
        os.environ.pop("MASTER_PORT")
    else:
        os.environ["MASTER_PORT"] = port
    yield info
    distributed.close()
