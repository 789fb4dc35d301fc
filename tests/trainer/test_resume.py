"""Checkpoints commit atomically and a resumed run continues exactly where the straight one went."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, exact_overrides, read_metrics, run_module, train_losses

pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _ok(result) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stop_and_resume_is_bit_identical(stage: int, data_cache: Path, tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _ok(run_module("trainer.train", exact_overrides(data_cache, straight, stage), cwd=REPO, launcher=TORCHRUN))

    _ok(run_module("trainer.train", [*exact_overrides(data_cache, resumed, stage), "train.exit_interval=10"], cwd=REPO, launcher=TORCHRUN))
    assert not (resumed / "export").exists()
    assert (resumed / "checkpoints" / "latest").read_text() == "step_0000010"
    output = _ok(run_module("trainer.train", exact_overrides(data_cache, resumed, stage), cwd=REPO, launcher=TORCHRUN))
    assert "resumed from" in output and "step_0000010" in output

    assert train_losses(resumed) == train_losses(straight)  # bit-identical, every step once
    assert [r["step"] for r in read_metrics(resumed)] == list(range(1, 21))
    a = load_file(straight / "export" / "model.safetensors")
    b = load_file(resumed / "export" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unverifiable_checkpoints_are_never_loaded(data_cache: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*exact_overrides(data_cache, run_dir, 2), "checkpoint.every=5"]
    _ok(run_module("trainer.train", [*args, "train.exit_interval=15"], cwd=REPO))
    first = read_metrics(run_dir)
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000005", "step_0000010", "step_0000015"]
    # The newest commit is damaged after the fact, and a save killed half-way left a .tmp dir.
    shard = next((ckpts / "step_0000015").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:-10])
    (ckpts / "step_0000020.tmp").mkdir()
    (ckpts / "step_0000020.tmp" / "junk.pt").write_bytes(b"half")

    output = _ok(run_module("trainer.train", args, cwd=REPO))
    assert "step_0000015" in output and "does not verify" in output
    assert "resumed from" in output and "step_0000010" in output
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 21))
    # Steps 11-15 ran twice; the first records moved aside, the recomputation matches them.
    superseded = [json.loads(line) for line in (run_dir / "metrics.superseded.jsonl").read_text().splitlines()]
    assert [r["step"] for r in superseded] == list(range(11, 16))
    assert [r["loss"] for r in superseded] == [r["loss"] for r in records[10:15]]
    assert [r["loss"] for r in records[:15]] == [r["loss"] for r in first]
    assert (ckpts / "latest").read_text() == "step_0000020"


def test_resume_refuses_another_model_or_world_size(data_cache: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _ok(run_module("trainer.train", [*exact_overrides(data_cache, run_dir, 2), "train.exit_interval=10"], cwd=REPO))

    changed = run_module("trainer.train", [*exact_overrides(data_cache, run_dir, 2), "model.hidden_size=64"], cwd=REPO)
    assert changed.returncode != 0 and "Traceback" not in changed.stderr
    assert "model.hidden_size: checkpoint 128, now 64" in changed.stderr

    wider = run_module("trainer.train", exact_overrides(data_cache, run_dir, 2), cwd=REPO, launcher=TORCHRUN)
    assert wider.returncode != 0
    assert "saved by 1 ranks and this run has 2" in wider.stdout + wider.stderr
    # Nothing was lost: the checkpoint is still there, and a matching run still resumes from it.
    output = _ok(run_module("trainer.train", exact_overrides(data_cache, run_dir, 2), cwd=REPO))
    assert "resumed from" in output


def test_killed_at_random_moments_always_resumes_from_a_committed_checkpoint(data_cache: Path, tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # A checkpoint every step, so most kills land inside a save.
    args = ["train.steps=30", "checkpoint.every=1", "checkpoint.keep_last=2"]
    _ok(run_module("trainer.train", [*exact_overrides(data_cache, straight, 2), *args], cwd=REPO))

    cmd = [sys.executable, "-m", "trainer.train", *exact_overrides(data_cache, killed, 2), *args]
    rng = random.Random(1234)
    kills = 0
    for _ in range(10):
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
        time.sleep(rng.uniform(5.0, 9.0))  # start-up takes about 5 s here
        if proc.poll() is not None:
            break  # finished before this kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        committed = sorted((killed / "checkpoints").glob("step_???????"))
        assert len(committed) <= 3, "retention must not let checkpoints pile up"
    assert kills >= 5
    _ok(run_module("trainer.train", [*exact_overrides(data_cache, killed, 2), *args], cwd=REPO))
    assert [r["step"] for r in read_metrics(killed)] == list(range(1, 31))
    assert train_losses(killed) == train_losses(straight)
    a = load_file(straight / "export" / "model.safetensors")
    b = load_file(killed / "export" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
