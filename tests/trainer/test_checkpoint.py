"""A save of a step that is already committed, killed at any point, leaves that step committed."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from zeroforge.trainer.background_save import file_entry
from zeroforge.trainer.checkpoint import _commit, find_resume_checkpoint, step_tag
from zeroforge.trainer.config import compose_config
from zeroforge.trainer.distributed import DistInfo
from zeroforge.trainer.rundir import check_run_dir

ONE_PROCESS = DistInfo(0, 1, 0)


class _Killed(BaseException):
    pass


def _save(root: Path, step: int, value: float) -> None:
    """What Checkpointer.save leaves for the commit (a complete step_<N>.tmp), then the commit."""
    tmp = root / (step_tag(step) + ".tmp")
    tmp.mkdir(parents=True)
    torch.save({"w": torch.tensor(value)}, tmp / "state.pt")
    _commit(root, tmp, root / step_tag(step), {"step": step, "files": {"state.pt": file_entry(tmp / "state.pt")}})


def _resumed_value(root: Path) -> float:
    found = find_resume_checkpoint(root, "auto", ONE_PROCESS)
    assert found == root / step_tag(10)
    return torch.load(found / "state.pt", weights_only=True)["w"].item()


def _dies_at(n: int) -> Callable[[Callable], Callable]:
    """Wraps functions so that the process 'dies' before the n-th call of any of them."""
    calls = itertools.count()

    def wrap(fn: Callable) -> Callable:
        def call(*args, **kwargs):
            if next(calls) == n:
                raise _Killed
            return fn(*args, **kwargs)

        return call

    return wrap


def test_a_resave_killed_at_any_point_leaves_a_committed_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    resumed = []
    for n in itertools.count():
        root = tmp_path / str(n)
        _save(root, 10, 1.0)
        # Every rename and deletion in the commit is a point where a kill changes what is on disk.
        dies = _dies_at(n)
        with monkeypatch.context() as patch:
            patch.setattr(Path, "rename", dies(Path.rename))
            patch.setattr(shutil, "rmtree", dies(shutil.rmtree))
            try:
                _save(root, 10, 2.0)
            except _Killed:
                pass
            else:
                break  # the re-save ran to its end: a kill before each of its steps was tried
        resumed.append(_resumed_value(root))
        assert not list(root.glob("*.old"))
    # Killed before the new copy was renamed into place, the old one resumes; after, the new one.
    assert resumed == [1.0, 1.0] + [2.0] * (len(resumed) - 2) and len(resumed) >= 4


def test_a_run_whose_only_checkpoint_was_being_resaved_still_resumes(tmp_path: Path) -> None:
    cfg = compose_config([f"run.dir={tmp_path / 'run'}"])
    root = Path(cfg.checkpoint.dir)
    _save(root, 10, 1.0)
    # The kill came between the two renames: only the old copy and the uncommitted new one are left.
    (root / step_tag(10)).rename(root / (step_tag(10) + ".old"))
    shutil.copytree(root / (step_tag(10) + ".old"), root / (step_tag(10) + ".tmp"))
    (Path(cfg.run.dir) / "metrics.jsonl").write_text('{"step": 10}\n')

    check_run_dir(cfg.run, cfg.checkpoint)  # not refused as a run with nothing to resume
    assert _resumed_value(root) == 1.0
    assert not (root / (step_tag(10) + ".old")).exists()
