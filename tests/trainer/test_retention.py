"""Retention keeps the newest checkpoints, every M-th, and whatever `latest` names."""

from __future__ import annotations

import json
from pathlib import Path

from zeroforge.trainer.background_save import file_entry
from zeroforge.trainer.checkpoint import LATEST, MANIFEST, apply_retention, committed_checkpoints, find_resume_checkpoint
from zeroforge.trainer.distributed import DistInfo


def _make(root: Path, steps: list[int], latest: int) -> None:
    for step in steps:
        (root / f"step_{step:07d}").mkdir(parents=True)
    (root / LATEST).write_text(f"step_{latest:07d}")


def test_keeps_the_newest_k_and_every_mth(tmp_path: Path) -> None:
    _make(tmp_path, [10, 20, 30, 40, 50, 60], latest=60)
    apply_retention(tmp_path, keep_last=2, keep_every=20)
    assert [p.name for p in committed_checkpoints(tmp_path)] == ["step_0000060", "step_0000050", "step_0000040", "step_0000020"]


def test_never_removes_what_latest_names(tmp_path: Path) -> None:
    # A commit renamed step 30 but was killed before moving `latest`, which still names step 20.
    _make(tmp_path, [10, 20, 30], latest=20)
    apply_retention(tmp_path, keep_last=1, keep_every=None)
    assert [p.name for p in committed_checkpoints(tmp_path)] == ["step_0000030", "step_0000020"]


def test_removes_dead_partial_saves_but_not_a_newer_one(tmp_path: Path) -> None:
    _make(tmp_path, [10, 20], latest=20)
    (tmp_path / "step_0000015.tmp").mkdir()
    (tmp_path / "step_0000030.tmp").mkdir()
    apply_retention(tmp_path, keep_last=3, keep_every=None)
    assert not (tmp_path / "step_0000015.tmp").exists() and (tmp_path / "step_0000030.tmp").exists()
    assert len(committed_checkpoints(tmp_path)) == 2


def _commit_verifiable(root: Path, steps: list[int]) -> None:
    """Checkpoints whose manifests verify: one file each, holding its step; `latest` the newest."""
    for step in steps:
        path = root / f"step_{step:07d}"
        path.mkdir(parents=True)
        (path / "state.bin").write_text(str(step))
        (path / MANIFEST).write_text(json.dumps({"step": step, "files": {"state.bin": file_entry(path / "state.bin")}}))
    (root / LATEST).write_text(f"step_{max(steps):07d}")


def test_checkpoints_newer_than_the_one_resumed_are_set_aside_for_good(tmp_path: Path) -> None:
    one_process = DistInfo(rank=0, world_size=1, local_rank=0)
    _commit_verifiable(tmp_path, [10, 20, 30])
    assert find_resume_checkpoint(tmp_path, str(tmp_path / "step_0000010"), one_process) == tmp_path / "step_0000010"
    abandoned = tmp_path / "abandoned"
    moved = {p.name: (p / "state.bin").read_text() for p in abandoned.iterdir()}
    assert moved == {"step_0000020": "20", "step_0000030": "30"} and all((p / MANIFEST).exists() for p in abandoned.iterdir())
    assert [p.name for p in committed_checkpoints(tmp_path)] == ["step_0000010"]
    # The resumed run commits step 15: retention and a later auto-resume see only this timeline,
    # although the step 30 set aside is newer and verifies.
    _commit_verifiable(tmp_path, [15])
    apply_retention(tmp_path, keep_last=1, keep_every=None)
    assert find_resume_checkpoint(tmp_path, "auto", one_process) == tmp_path / "step_0000015"
    assert {p.name: (p / "state.bin").read_text() for p in abandoned.iterdir()} == moved


def test_a_step_set_aside_twice_keeps_both_copies(tmp_path: Path) -> None:
    """Resumed from step 10 twice, each time after training past step 20 again: both abandoned
    copies of step 20 stay, neither replaces the other."""
    one_process = DistInfo(rank=0, world_size=1, local_rank=0)
    _commit_verifiable(tmp_path, [10, 20])
    find_resume_checkpoint(tmp_path, str(tmp_path / "step_0000010"), one_process)
    (tmp_path / "abandoned" / "step_0000020" / "state.bin").write_text("first timeline")
    _commit_verifiable(tmp_path, [20])
    assert find_resume_checkpoint(tmp_path, str(tmp_path / "step_0000010"), one_process) == tmp_path / "step_0000010"
    moved = {p.name: (p / "state.bin").read_text() for p in (tmp_path / "abandoned").iterdir()}
    assert moved == {"step_0000020": "first timeline", "step_0000020.1": "20"}
    assert [p.name for p in committed_checkpoints(tmp_path)] == ["step_0000010"]
