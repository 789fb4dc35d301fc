"""A checkpoint saved by one world size resumes on another (DeepSpeed's universal checkpoint),
converted by the launcher before the ranks start; a rank never converts."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import REPO, TORCHRUN, exact_overrides, run_module, train_losses
from zeroforge.trainer.checkpoint import MANIFEST, check_resumable
from zeroforge.trainer.config import ConfigError, compose_config
from zeroforge.trainer.distributed import DistInfo
from zeroforge.trainer.universal import CheckpointSizes, convert, plan_conversion, universal_checkpoint


def _ok(result) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("stage,first,saved,then", [(2, TORCHRUN, 2, 1), (3, [], 1, 2)], ids=["zero2-2to1", "zero3-1to2"])
def test_resume_on_another_world_size_continues_the_run(
    stage: int, first: list[str], saved: int, then: int, single_process_run: Path, data_cache: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = exact_overrides(data_cache, run_dir, stage)
    _ok(run_module("zeroforge.trainer.train", [*args, "train.exit_interval=10"], cwd=REPO, launcher=first))
    # The resume through the real launcher, which plans the conversion, converts, then starts torchrun.
    output = _ok(run_module("zeroforge.launcher", [*args, f"cluster.nproc_per_node={then}", "launcher.harness=false"], cwd=REPO))
    assert f"(saved by {saved} ranks, this job has {then}) is converted to DeepSpeed's universal checkpoint" in output
    step, launched = run_dir / "checkpoints" / "step_0000010", output.index("launching: ")
    converting, converted = output.index(f"converting {step} to"), output.index(f"converted {step / 'universal'} in ")
    assert output.index("plan: resume on another world size") < converting < converted < launched  # before torchrun
    assert "converting " not in output[launched:]  # no rank converted
    assert (step / "universal").is_dir()
    assert "through DeepSpeed's universal checkpoint" in output[launched:] and "(step 10)" in output[launched:]

    # The same data order and the same optimizer state: the losses after the resume are those of
    # an uninterrupted run, up to summation order across a different number of ranks.
    expected, found = train_losses(single_process_run), train_losses(run_dir)
    assert len(found) == len(expected) == 20
    torch.testing.assert_close(torch.tensor(found), torch.tensor(expected), rtol=1e-5, atol=0)


def test_a_rank_never_converts_and_names_the_command_that_does(tmp_path: Path) -> None:
    checkpoint = tmp_path / "step_0000010"
    checkpoint.mkdir()
    with pytest.raises(ConfigError, match="`zeroforge launch` converts it before the ranks start.*run `zeroforge universal`"):
        universal_checkpoint(checkpoint, DistInfo(0, 1, 0))
    assert not any(checkpoint.iterdir())
    (checkpoint / "universal").mkdir()  # as the launcher leaves it
    assert universal_checkpoint(checkpoint, DistInfo(0, 1, 0)) == checkpoint / "universal"


def test_a_conversion_past_its_time_limit_is_stopped_with_its_workers(tmp_path: Path) -> None:
    checkpoint = tmp_path / "step_0000010"
    checkpoint.mkdir()
    plan = plan_conversion(CheckpointSizes(1, 1.0, 1.0, 1.0, 1), None, 0.5)
    with pytest.raises(ConfigError, match="took longer than its time limit of 1 s.*checkpoint.universal_timeout_s"):
        convert(checkpoint, plan, timeout_s=1)  # the converter takes longer than that to import DeepSpeed
    assert not any(checkpoint.iterdir())
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(checkpoint) in " ".join(p.info["cmdline"] or [])]


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
