"""A checkpoint saved by one world size resumes on another (DeepSpeed's universal checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import REPO, TORCHRUN, exact_overrides, run_module, train_losses
from zeroforge.trainer.checkpoint import MANIFEST, check_resumable
from zeroforge.trainer.config import ConfigError, compose_config


def _ok(result) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("stage,first,then", [(2, TORCHRUN, []), (3, [], TORCHRUN)], ids=["zero2-2to1", "zero3-1to2"])
def test_resume_on_another_world_size_continues_the_run(
    stage: int, first: list[str], then: list[str], single_process_run: Path, data_cache: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = exact_overrides(data_cache, run_dir, stage)
    _ok(run_module("zeroforge.trainer.train", [*args, "train.exit_interval=10"], cwd=REPO, launcher=first))
    output = _ok(run_module("zeroforge.trainer.train", args, cwd=REPO, launcher=then))
    assert "resuming on" in output and "through DeepSpeed's universal checkpoint" in output
    assert (run_dir / "checkpoints" / "step_0000010" / "universal").is_dir()
    assert "resumed from" in output and "(step 10)" in output

    # The same data order and the same optimizer state: the losses after the resume are those of
    # an uninterrupted run, up to summation order across a different number of ranks.
    expected, found = train_losses(single_process_run), train_losses(run_dir)
    assert len(found) == len(expected) == 20
    torch.testing.assert_close(torch.tensor(found), torch.tensor(expected), rtol=1e-5, atol=0)


def test_offloaded_optimizer_state_is_not_resumed_on_another_world_size(tmp_path: Path) -> None:
    cfg = compose_config(["deepspeed=zero3-offload"])
    manifest = {"data": {"fingerprint": "f", "seq_len": cfg.data.seq_len, "seed": cfg.seed}, "tokenizer_hash": "t"}
    checkpoint = tmp_path / "step_0000010"
    checkpoint.mkdir()
    run = {**manifest, "model": OmegaConf.to_container(cfg.model, resolve=True), "world_size": 2, "tokens": 0}
    (checkpoint / MANIFEST).write_text(json.dumps({"step": 10, "run": run, "files": {}}))
    data_manifest = {"fingerprint": "f", "tokenizer_hash": "t"}
    assert (
        check_resumable(
            checkpoint, model=cfg.model, data=cfg.data, seed=cfg.seed, deepspeed=cfg.deepspeed, data_manifest=data_manifest, world_size=2
        )
        is False
    )
    with pytest.raises(ConfigError, match="saved by 2 ranks and this run has 1; with ZeRO-Offload"):
        check_resumable(
            checkpoint, model=cfg.model, data=cfg.data, seed=cfg.seed, deepspeed=cfg.deepspeed, data_manifest=data_manifest, world_size=1
        )
