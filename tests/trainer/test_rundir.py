"""The run directory's config.yaml records where and with what the run ran."""

from __future__ import annotations

import platform
import socket
from importlib import metadata
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from zeroforge.trainer.config import compose_config
from zeroforge.trainer.rundir import git_commit, write_run_dir


def test_config_records_the_system_and_the_slurm_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    written = OmegaConf.load(write_run_dir(compose_config([f"run.dir={tmp_path / 'run'}"]), probe_gpu=True) / "config.yaml")
    assert written.code_version == git_commit()
    assert OmegaConf.to_container(written.system) == {
        "hostname": socket.gethostname(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gpu_count": torch.cuda.device_count(),
        "slurm_job_id": "4242",
        "versions": {
            "python": platform.python_version(),
            **{name: metadata.version(name) for name in ("zeroforge", "torch", "deepspeed", "transformers", "datasets")},
        },
    }
    monkeypatch.delenv("SLURM_JOB_ID")
    launcher_written = OmegaConf.load(write_run_dir(compose_config([f"run.dir={tmp_path / 'run'}"])) / "config.yaml").system
    assert launcher_written.slurm_job_id is None
    # The launcher leaves the GPU to the trainer, which rewrites the file where it trains.
    assert launcher_written.gpu is None and launcher_written.gpu_count is None
