"""Retention keeps the newest checkpoints, every M-th, and whatever `latest` names."""

from __future__ import annotations

from pathlib import Path

from zeroforge.trainer.checkpoint import LATEST, apply_retention, committed_checkpoints


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
