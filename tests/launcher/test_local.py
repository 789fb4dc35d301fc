"""`zeroforge launch` on cluster=local: the torchrun command comes from the cluster config."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from tests.conftest import REPO, run_module
from zeroforge.launcher.local import torchrun_command
from zeroforge.trainer.config import compose_config
from zeroforge.trainer.rundir import job_config_options


def test_dry_run_prints_the_torchrun_command_and_starts_nothing(tmp_path: Path) -> None:
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    overrides = ["experiment=smoke", "cluster.nproc_per_node=2", f"data.cache_dir={cache}", f"run.dir={run_dir}"]
    result = run_module("zeroforge.launcher", [*overrides, "launcher.dry_run=true"], cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = [shlex.split(line) for line in result.stdout.splitlines() if line.startswith(shlex.quote(sys.executable))]
    assert printed == [torchrun_command(compose_config(overrides).cluster, job_config_options(run_dir))]
    # No data prepared, no run directory (so no checkpoint or metrics), no rank started.
    assert not cache.exists() and not run_dir.exists()
    assert "launching:" not in result.stdout + result.stderr and "step 1 |" not in result.stdout + result.stderr
