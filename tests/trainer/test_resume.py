"""Checkpoints commit atomically and a resumed run continues exactly where the straight one went."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, TORCHRUN, exact_overrides, read_metrics, run_module, train_losses

pytestmark = pytest.mark.slow


def _committed_step(run_dir: Path) -> int:
    latest = run_dir / "checkpoints" / "latest"
    return int(latest.read_text().split("_")[1]) if latest.exists() else 0


def _ok(result) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


# ZeRO-2 runs with attention dropout, so the losses after the resume depend on every rank's
# restored RNG state, not only on weights, optimizer and data position; and with a 5-step warmup,
# so it resumes well into the cosine decay (the others resume as the 10-step warmup ends).
# ZeRO-1 saves and loads through the same DeepSpeed optimizer as ZeRO-2 (stage_1_and_2.py).
@pytest.mark.parametrize("stage,extra", [(2, ["+model.extra.attention_dropout=0.2", "optim.warmup_steps=5"]), (3, [])])
def test_stop_and_resume_is_bit_identical(
    stage: int, extra: list[str], data_cache: Path, tmp_path: Path, two_rank_run: Callable[..., tuple[Path, str]]
) -> None:
    straight, _ = two_rank_run(stage, *extra)
    resumed = tmp_path / "resumed"

    args = [*exact_overrides(data_cache, resumed, stage), *extra]
    _ok(run_module("zeroforge.trainer.train", [*args, "train.exit_interval=10"], cwd=REPO, launcher=TORCHRUN))
    assert not (resumed / "export").exists()
    assert (resumed / "checkpoints" / "latest").read_text() == "step_0000010"
    output = _ok(run_module("zeroforge.trainer.train", args, cwd=REPO, launcher=TORCHRUN))
    assert "resumed from" in output and "step_0000010" in output

    assert train_losses(resumed) == train_losses(straight)  # bit-identical, every step once
    assert [r["step"] for r in read_metrics(resumed)] == list(range(1, 21))
    assert [r["lr"] for r in read_metrics(resumed)] == [r["lr"] for r in read_metrics(straight)]
    a = load_file(straight / "export" / "model.safetensors")
    b = load_file(resumed / "export" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def stopped_at_15(data_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A single-process ZeRO-2 run with checkpoints at steps 5, 10 and 15, stopped by
    train.exit_interval=15. The tests below each resume (or refuse to resume) a copy of it."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    args = [*exact_overrides(data_cache, run_dir, 2), "checkpoint.every=5", "train.exit_interval=15"]
    _ok(run_module("zeroforge.trainer.train", args, cwd=REPO))
    return run_dir


def _copy_of(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_unverifiable_checkpoints_are_never_loaded(stopped_at_15: Path, data_cache: Path, tmp_path: Path) -> None:
    run_dir = _copy_of(stopped_at_15, tmp_path)
    args = [*exact_overrides(data_cache, run_dir, 2), "checkpoint.every=5"]
    first = read_metrics(run_dir)
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000005", "step_0000010", "step_0000015"]
    # The newest commit is damaged after the fact (one byte, same size: only the checksum can
    # tell), and a save killed half-way left a .tmp dir.
    shard = next((ckpts / "step_0000015").glob("*optim_states.pt"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (ckpts / "step_0000020.tmp").mkdir()
    (ckpts / "step_0000020.tmp" / "junk.pt").write_bytes(b"half")

    output = _ok(run_module("zeroforge.trainer.train", args, cwd=REPO))
    assert "step_0000015" in output and "does not match its checksum" in output
    assert "resumed from" in output and "step_0000010" in output
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 21))
    # Steps 11-15 ran twice; the first records moved aside, the recomputation matches them.
    superseded = [json.loads(line) for line in (run_dir / "metrics.superseded.jsonl").read_text().splitlines()]
    assert [r["step"] for r in superseded] == list(range(11, 16))
    assert [r["loss"] for r in superseded] == [r["loss"] for r in records[10:15]]
    assert [r["loss"] for r in records[:15]] == [r["loss"] for r in first]
    assert (ckpts / "latest").read_text() == "step_0000020"
    assert not list(ckpts.glob("*.tmp"))
    # The damaged step 15 was newer than the one resumed: it moved whole to abandoned/ rather than
    # being saved over, and retention (keep_last=3) counted only this timeline's steps.
    abandoned = ckpts / "abandoned" / "step_0000015"
    assert (abandoned / shard.relative_to(ckpts / "step_0000015")).read_bytes() == bytes(data)
    assert (abandoned / "manifest.json").exists()
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000010", "step_0000015", "step_0000020"]


def test_no_verifiable_checkpoint_is_an_error_not_a_fresh_start(stopped_at_15: Path, data_cache: Path, tmp_path: Path) -> None:
    run_dir = _copy_of(stopped_at_15, tmp_path)
    steps = ["step_0000005", "step_0000010", "step_0000015"]
    for step in steps:
        (run_dir / "checkpoints" / step / "manifest.json").unlink()
    result = run_module("zeroforge.trainer.train", exact_overrides(data_cache, run_dir, 2), cwd=REPO)
    assert result.returncode != 0 and "no checkpoint in" in result.stderr and all(step in result.stderr for step in steps)
    assert len(read_metrics(run_dir)) == 15  # nothing was set aside or overwritten


def test_resume_refuses_another_model(stopped_at_15: Path, data_cache: Path, tmp_path: Path) -> None:
    """(Another world size is allowed: tests/trainer/test_world_size_change.py.)"""
    run_dir = _copy_of(stopped_at_15, tmp_path)
    changed = run_module("zeroforge.trainer.train", [*exact_overrides(data_cache, run_dir, 2), "model.hidden_size=64"], cwd=REPO)
    assert changed.returncode != 0 and "Traceback" not in changed.stderr
    assert "model.hidden_size: checkpoint 128, now 64" in changed.stderr
    # Nothing was lost: the checkpoint is still there, and a matching run still resumes from it.
    output = _ok(run_module("zeroforge.trainer.train", exact_overrides(data_cache, run_dir, 2), cwd=REPO))
    assert "resumed from" in output


def test_killed_at_random_moments_always_resumes_from_a_committed_checkpoint(data_cache: Path, tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # A checkpoint every step, so most kills land inside a save.
    args = ["train.steps=30", "checkpoint.every=1", "checkpoint.keep_last=2"]
    _ok(run_module("zeroforge.trainer.train", [*exact_overrides(data_cache, straight, 2), *args], cwd=REPO))

    cmd = [sys.executable, "-m", "zeroforge.trainer.train", *exact_overrides(data_cache, killed, 2), *args]
    rng = random.Random(1234)
    kills = 0
    for _ in range(5):
        before = _committed_step(killed)
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
        # Armed once this restart has committed a step of its own, so the kill lands in the
        # training loop (mostly inside a save), never in start-up.
        deadline = time.monotonic() + 120
        while proc.poll() is None and _committed_step(killed) <= before:
            assert time.monotonic() < deadline, "no progress after a restart"
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is not None:
            break  # finished before this kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        committed = sorted((killed / "checkpoints").glob("step_???????"))
        assert len(committed) <= 3, "retention must not let checkpoints pile up"
    assert kills >= 3
    _ok(run_module("zeroforge.trainer.train", [*exact_overrides(data_cache, killed, 2), *args], cwd=REPO))
    assert [r["step"] for r in read_metrics(killed)] == list(range(1, 31))
    assert train_losses(killed) == train_losses(straight)
    a = load_file(straight / "export" / "model.safetensors")
    b = load_file(killed / "export" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
