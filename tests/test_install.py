"""zeroforge installed as a wheel (not editable), driven from a user's own project directory: its
own data.py, trainer.py and launcher.py, and its experiment config through --config-dir."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import UserProject, read_metrics

pytestmark = pytest.mark.slow


def _zeroforge(user: UserProject, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{user.bin}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(user.bin / "zeroforge"), *args], cwd=user.project, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_runs_a_users_experiment_on_two_ranks_from_their_project(user_project: UserProject, data_cache: Path) -> None:
    where = subprocess.run(
        [
            str(user_project.bin / "python"),
            "-c",
            "import zeroforge.launcher, zeroforge.trainer.config as c; print(zeroforge.launcher.__file__); print(c.CONF_DIR)",
        ],
        cwd=user_project.project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert where.returncode == 0, where.stderr[-3000:]
    assert all(line.startswith(str(user_project.venv)) for line in where.stdout.split()), where.stdout  # the wheel's code and conf/

    run_dir = user_project.project / "runs" / "mine"
    result = _zeroforge(
        user_project,
        "launch",
        "experiment=mine",
        "--config-dir",
        "myconf",
        "cluster.nproc_per_node=2",
        f"data.cache_dir={data_cache}",
        "logging.wandb.mode=disabled",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    written = OmegaConf.load(run_dir / "config.yaml")
    assert written.run.name == "mine" and written.optim.lr == user_project.experiment["optim"]["lr"]
    assert written.train.steps == 6 and written.cluster.nproc_per_node == 2
    assert "world size 2" in result.stdout + result.stderr
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, 7))
    assert (run_dir / "export" / "model.safetensors").exists()
    assert not list(user_project.project.glob("*.imported")), "a user's module was imported in place of zeroforge's"


def test_a_mistake_in_a_users_config_is_refused_with_exit_code_2(user_project: UserProject, data_cache: Path) -> None:
    bad = user_project.project / "myconf" / "experiment" / "broken.yaml"
    bad.write_text("# @package _global_\noptim:\n  lr: -1.0\n")
    result = _zeroforge(user_project, "launch", "--config-dir", "myconf", "experiment=broken", f"data.cache_dir={data_cache}", timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "zeroforge: configuration error: optim.lr must be above 0, found -1.0." in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
