"""checkpoint.async_save: files written in the background, committed after the next step, and
a run resumed from them continues exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, exact_overrides, run_module, train_losses
from zeroforge.trainer.background_save import BackgroundWriter, snapshot


def test_a_snapshot_does_not_follow_later_changes() -> None:
    weights = torch.zeros(3)
    groups = [{"lr": 1.0, "params": [0]}]
    state = snapshot({"module": {"w": weights}, "param_groups": groups})
    weights.add_(1.0)
    groups[0]["lr"] = 2.0
    assert torch.equal(state["module"]["w"], torch.zeros(3))
    assert state["param_groups"][0]["lr"] == 1.0


def test_a_failed_background_write_is_reported(tmp_path: Path) -> None:
    writer = BackgroundWriter(zipfile_serialization=True)
    writer.save({"w": torch.ones(2)}, str(tmp_path / "ok.pt"))
    writer.save({"w": torch.ones(2)}, str(tmp_path / "missing" / "dir" / "x.pt"))
    written, problem = writer.wait()
    assert problem is not None and "missing" in problem
    assert list(written) == [tmp_path / "ok.pt"] and written[tmp_path / "ok.pt"]["bytes"] == (tmp_path / "ok.pt").stat().st_size
    assert torch.equal(torch.load(tmp_path / "ok.pt")["w"], torch.ones(2))
    assert writer.wait() == ({}, None)  # reported once


@pytest.mark.slow
def test_async_checkpoints_commit_and_resume_exactly(single_process_run: Path, data_cache: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*exact_overrides(data_cache, run_dir, 2), "checkpoint.async_save=true", "checkpoint.every=5"]
    result = run_module("zeroforge.trainer.train", [*args, "train.exit_interval=12"], cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step_0000005", "step_0000010", "step_0000012"]
    assert (checkpoints / "latest").read_text() == "step_0000012"
    for step_dir in ("step_0000005", "step_0000010", "step_0000012"):
        manifest = json.loads((checkpoints / step_dir / "manifest.json").read_text())
        for name, entry in manifest["files"].items():
            assert (checkpoints / step_dir / name).stat().st_size == entry["bytes"]

    result = run_module("zeroforge.trainer.train", args, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from" in result.stdout and "(step 12)" in result.stdout
    expected, found = train_losses(single_process_run), train_losses(run_dir)
    assert len(found) == 20
    torch.testing.assert_close(torch.tensor(found), torch.tensor(expected), rtol=1e-5, atol=0)
