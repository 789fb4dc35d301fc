"""A stop signal to one rank: every rank saves the same step, exits to be requeued, resumes exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest

from tests.conftest import REPO, TORCHRUN, exact_overrides, read_metrics, run_module, train_losses
from zeroforge.trainer.preemption import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slow


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and any(r["step"] >= step for r in read_metrics(run_dir)):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def _rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        if "zeroforge.trainer.train" in " ".join(child.cmdline()) and child.environ().get("RANK") == str(rank):
            return child
    raise AssertionError(f"rank {rank} not found")


def test_sigusr1_to_one_rank_saves_everywhere_and_resumes_exactly(
    data_cache: Path, tmp_path: Path, two_rank_run: Callable[..., tuple[Path, str]]
) -> None:
    straight, _ = two_rank_run(2)  # the same run, uninterrupted
    steps = len(train_losses(straight))
    stopped = tmp_path / "stopped"
    cmd = [*TORCHRUN, "-m", "zeroforge.trainer.train", *exact_overrides(data_cache, stopped, 2)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    _wait_for_step(stopped, 5, proc)
    _rank_process(proc, 1).send_signal(signal.SIGUSR1)
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode != 0
    assert output.count("stop requested: saved step") == 2, output[-3000:]
    assert f"exit code {REQUEUE_EXIT_CODE}" in output
    latest = (stopped / "checkpoints" / "latest").read_text()
    saved_step = int(latest.split("_")[1])
    assert 5 <= saved_step < steps
    # Both ranks saved the same step.
    assert output.count(f"saved step {saved_step};") == 2

    result = run_module("zeroforge.trainer.train", exact_overrides(data_cache, stopped, 2), cwd=REPO, launcher=TORCHRUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert train_losses(stopped) == train_losses(straight)
    assert [r["step"] for r in read_metrics(stopped)] == list(range(1, steps + 1))


def test_sigterm_alone_exits_with_the_requeue_code(data_cache: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "zeroforge.trainer.train", *exact_overrides(data_cache, run_dir, 0), "train.steps=200"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    _wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == REQUEUE_EXIT_CODE, output[-3000:]
    assert (run_dir / "checkpoints" / "latest").exists() and not (run_dir / "export").exists()
