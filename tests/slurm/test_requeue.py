"""slurm/pretrain.sh where Slurm refuses to requeue the job, without a cluster: the script is
sourced for its functions, with the variables the job's start exports (launcher/job.py), and a
stub `scontrol` that fails, since what is tested is the script's handling of that failure."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.slurm.test_pretrain import ONE_CPU_RANK_PER_NODE, SCRIPT
from zeroforge.launcher import job
from zeroforge.trainer.config import compose_config
from zeroforge.trainer.preemption import REQUEUE_EXIT_CODE
from zeroforge.trainer.rundir import job_config_options

REFUSAL = "slurm_requeue error: Requested operation is presently disabled"


def _requeue(
    tmp_path: Path, run_dir: Path, args: list[str], scontrol_exit: int, monkeypatch: pytest.MonkeyPatch
) -> subprocess.CompletedProcess:
    """requeue_or_fail with the script's arguments `args`, in a two-node job on partition gpu."""
    slurm_env = {
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NAME": "zeroforge",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_PARTITION": "gpu",
        "SLURM_SUBMIT_DIR": str(tmp_path / "my project"),
    }
    monkeypatch.setattr(job, "preflight", lambda *args, **kwargs: None)  # no data: the requeue is under test
    exports = tmp_path / "job.env"
    cfg = compose_config(["cluster=slurm", "cluster.nodes=2", *ONE_CPU_RANK_PER_NODE, "train.global_batch_size=32", f"run.dir={run_dir}"])
    job.write_exports(job.job_environment(cfg, slurm_env), exports)
    stub = tmp_path / "bin" / "scontrol"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text(f'#!/bin/bash\n[[ "$*" == "requeue 42" ]] || exit 99\necho "{REFUSAL}" >&2\nexit {scontrol_exit}\n')
    stub.chmod(0o755)
    env = {**os.environ, **slurm_env, "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}"}
    source = 'source "$1" && source "$2" && shift 2 && requeue_or_fail "$@"'
    return subprocess.run(
        ["bash", "-c", source, "bash", str(exports), str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60
    )


def _resubmit_line(stderr: str) -> list[str]:
    lines = stderr.splitlines()
    at = next(i for i, line in enumerate(lines) if "resubmit the job" in line)
    return shlex.split(lines[at + 1])


def test_a_refused_requeue_fails_the_job_with_the_command_that_resumes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["model=llama-1b", "run.name=with space", "--config-dir", "myconf"]
    result = _requeue(tmp_path, tmp_path / "run", args, scontrol_exit=1, monkeypatch=monkeypatch)
    assert result.returncode == REQUEUE_EXIT_CODE, result.stdout + result.stderr
    assert f"scontrol requeue 42 failed: {REFUSAL}" in result.stderr and "training is unfinished" in result.stderr
    # Submitted by hand: the same arguments from the same directory, on the allocation the job saw.
    assert _resubmit_line(result.stderr) == [
        "cd",
        str(tmp_path / "my project"),
        "&&",
        "sbatch",
        "--job-name=zeroforge",
        "--nodes=2",
        "--partition=gpu",
        str(SCRIPT.resolve()),
        *args,
    ]
    assert "add the other sbatch flags it was submitted with (such as --time)" in result.stderr


def test_a_launched_job_is_resubmitted_with_the_launchers_own_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    launched = "sbatch --job-name=default --nodes=2 --time=2-00:00:00 /zf/slurm/pretrain.sh --config-path /x --config-name job"
    (run_dir / "sbatch.txt").write_text(launched + "\n")
    result = _requeue(tmp_path, run_dir, job_config_options(run_dir), scontrol_exit=1, monkeypatch=monkeypatch)
    assert result.returncode == REQUEUE_EXIT_CODE, result.stdout + result.stderr
    assert _resubmit_line(result.stderr) == shlex.split(launched) and "other sbatch flags" not in result.stderr


def test_a_requeue_slurm_accepts_ends_the_script_quietly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _requeue(tmp_path, tmp_path / "run", ["model=llama-1b"], scontrol_exit=0, monkeypatch=monkeypatch)
    assert result.returncode == 0 and "failed" not in result.stderr, result.stdout + result.stderr
