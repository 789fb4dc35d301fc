"""`python -m zeroforge.launcher.torchrun`: torchrun that ends with the ranks' own exit code, so a
mistake the ranks find reaches the user as their one paragraph and exit code 2, not torchrun's
ChildFailedError traceback and 1."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, exact_overrides, run_module
from zeroforge.launcher.torchrun import exit_code

TORCHRUN = [sys.executable, "-m", "zeroforge.launcher.torchrun", "--standalone", "--nproc_per_node", "2"]


def test_the_node_exits_with_what_its_ranks_said() -> None:
    assert exit_code([2, -15]) == 2  # a rank refused the job; torchrun killed the other
    assert exit_code([75, 75]) == 75  # stopped after a checkpoint: requeue me
    assert exit_code([1, -15]) == 1 and exit_code([-15, 3]) == 3  # a rank's own code
    assert exit_code([-9]) == 137  # killed (the kernel's OOM killer), as a shell says it


def _refused(args: list[str]) -> str:
    result = run_module("zeroforge.trainer.train", args, cwd=REPO, launcher=TORCHRUN, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output and "ChildFailedError" not in output, output[-3000:]
    assert "step 1 |" not in output
    return output


@pytest.mark.slow
def test_a_resume_mismatch_found_by_the_ranks_exits_2_without_a_traceback(zero3_smoke_run: Path, data_cache: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(zero3_smoke_run, run_dir)
    args = [*exact_overrides(data_cache, run_dir, 3), "seed=7", "checkpoint.every=10"]
    output = _refused(args)
    assert "zeroforge: configuration error: cannot resume from" in output
    assert "seed (the data order): checkpoint 1234, now 7" in output


def test_a_field_out_of_its_rule_exits_2_from_the_rank_that_finds_it(data_cache: Path, tmp_path: Path) -> None:
    output = _refused([*exact_overrides(data_cache, tmp_path / "run", 2), "optim.lr=-1"])
    # Every rank checks, but torchrun stops the others once the first exits, often before they print.
    assert "zeroforge: configuration error: optim.lr must be above 0, found -1.0." in output
