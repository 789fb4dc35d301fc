"""`sbatch slurm/pretrain.sh` and `zeroforge launch cluster=slurm` on a real two-node Slurm."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, UserProject, exact_overrides, read_metrics, run_module, train_losses
from tests.slurm.cluster import SlurmCluster

pytestmark = pytest.mark.slow

SCRIPT = REPO / "slurm" / "pretrain.sh"
# Two nodes of one CPU rank each; the GPUs the test cluster declares stay unused.
ONE_CPU_RANK_PER_NODE = ["cluster.nproc_per_node=1", "cluster.gpus_per_node=0"]


def _submit(cluster: SlurmCluster, cwd: Path, *args: str, path: Optional[Path] = None) -> str:
    out = cluster.command("sbatch", "--parsable", *args, cwd=cwd, path=path)
    return out.strip().split(";")[0]


def test_two_nodes_train_exactly_like_local_torchrun(
    slurm_cluster: SlurmCluster, data_cache: Path, tmp_path: Path, two_rank_run: Callable[..., tuple[Path, str]]
) -> None:
    on_slurm = tmp_path / "slurm"
    job_id = _submit(
        slurm_cluster,
        tmp_path,
        "--nodes=2",
        f"--output={tmp_path}/slurm-%j.out",
        str(SCRIPT),
        *exact_overrides(data_cache, on_slurm, 2),
        *ONE_CPU_RANK_PER_NODE,
    )
    job = slurm_cluster.wait_for_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=420)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "0", log[-4000:]
    assert f"job {job_id} (restart 0): 2 nodes x 1 processes" in log
    assert "world size 2" in log
    # The run directory keeps its own copy of the job's log.
    assert "world size 2" in (on_slurm / "logs" / f"slurm-{job_id}.out").read_text()
    assert (on_slurm / "export" / "model.safetensors").exists()

    local, _ = two_rank_run(2)
    assert len(train_losses(on_slurm)) == 20
    assert train_losses(on_slurm) == train_losses(local)


def _wait_for_step(run_dir: Path, step: int, cluster: SlurmCluster, job_id: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and any(r.get("step", 0) >= step for r in read_metrics(run_dir)):
            return
        assert cluster.job(job_id)["JobState"] in {"PENDING", "RUNNING"}, cluster.job(job_id)
        time.sleep(0.5)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def test_warning_signal_checkpoints_requeues_and_resumes(slurm_cluster: SlurmCluster, data_cache: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # The stop lands a few steps after the signal (the script's trap touches the stop file, which the
    # trainer checks every step; at step 8 or 9 when measured): 60 steps leave seconds to spare, and
    # the requeued job finishes in seconds.
    steps = 60
    submitted = run_module(
        "zeroforge.launcher",
        [
            "experiment=smoke",
            "cluster=slurm",
            "cluster.nodes=2",
            *ONE_CPU_RANK_PER_NODE,
            f"data.cache_dir={data_cache}",
            f"run.dir={run_dir}",
            "logging.wandb.mode=offline",
            f"train.steps={steps}",
            "eval.every=0",
            "checkpoint.every=0",
            "logging.every=1",
        ],
        cwd=REPO,
        env=slurm_cluster.env,
        timeout=300,
    )
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    job_id = re.search(r"submitted job (\d+)", submitted.stdout).group(1)
    assert "pretrain.sh" in (run_dir / "sbatch.txt").read_text()
    assert (run_dir / "config.yaml").exists()

    _wait_for_step(run_dir, 5, slurm_cluster, job_id)
    slurm_cluster.command("scancel", "--signal=USR1", "--batch", job_id)
    job = slurm_cluster.rerun_requeued(job_id)

    log = (run_dir / "logs" / f"slurm-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", f"{job}\n{log[-4000:]}\n{slurm_cluster.logs()}"
    saved = re.search(r'"step": (\d+), "reason": "stop requested"', log)
    assert saved and 5 <= int(saved.group(1)) < steps, log[-4000:]
    assert f"job {job_id} (restart 1)" in log
    # Every optimizer step once, in order, across both attempts.
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, steps + 1))
    assert (run_dir / "export" / "model.safetensors").exists()
    # One wandb run, continued after the requeue under the same id.
    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2
    assert {p.name.rsplit("-", 1)[1] for p in attempts} == {(run_dir / "wandb_id").read_text().strip()}


def test_a_node_that_never_joins_fails_the_job_at_the_rendezvous_timeout(
    slurm_cluster: SlurmCluster, data_cache: Path, tmp_path: Path
) -> None:
    # The second node hangs where its torchrun would start (as a node with a stuck filesystem or a
    # wrong network would): the first must give up after cluster.rendezvous_timeout_s and
    # --kill-on-bad-exit must end the whole job, instead of both holding their nodes until the
    # time limit; the job names the node as hung. With no hang requeue left it fails (the requeue
    # itself: tests/slurm/test_hang_requeue.py). The job's own limit only bounds the test if that path breaks; it must exceed the
    # script's warning time (--signal=B:USR1@300), or Slurm signals the job as it starts.
    stuck = f"zf-stuck-node-{uuid.uuid4().hex[:8]}"  # its process name: unique to this test run
    shim = tmp_path / "bin" / "python"
    shim.parent.mkdir()
    shim.write_text(
        "#!/bin/bash\n"
        f'if [[ "${{SLURM_NODEID:-}}" == 1 && "$*" == "-m zeroforge.launcher.torchrun"* ]]; then exec -a {stuck} sleep 600; fi\n'
        f'exec {shlex.quote(sys.executable)} "$@"\n'
    )
    shim.chmod(0o755)
    timeout_s = 10
    job_id = _submit(
        slurm_cluster,
        tmp_path,
        "--nodes=2",
        "--time=10",
        f"--output={tmp_path}/slurm-%j.out",
        str(SCRIPT),
        *exact_overrides(data_cache, tmp_path / "run", 0),
        *ONE_CPU_RANK_PER_NODE,
        f"cluster.rendezvous_timeout_s={timeout_s}",
        "cluster.max_hang_requeues=0",
        path=shim.parent,
    )
    job = slurm_cluster.wait_for_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=420)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert job["JobState"] == "FAILED" and job["Restarts"] == "0", f"{job}\n{log[-4000:]}"
    assert "RendezvousTimeoutError" in log, log[-4000:]
    stuck_node = slurm_cluster.command("scontrol", "show", "hostnames", job["NodeList"]).split()[1]
    assert f"{stuck_node} never started torchrun" in log and f"hosts to exclude: {stuck_node}\n" in log, log[-4000:]
    assert "not requeued: cluster.max_hang_requeues=0 reached" in log and job["ExitCode"] == "76:0", f"{job}\n{log[-4000:]}"
    # torchrun's own join timeout is 600 s, beyond the job's limit: failing well before that means
    # the configured one applied (the rest is the job's start-up on a busy 2-core machine).
    minutes, seconds = map(int, job["RunTime"].split(":")[-2:])
    assert 60 * minutes + seconds < timeout_s + 130, f"the job ran {job['RunTime']}, expected about {timeout_s}s\n{log[-4000:]}"
    # Ending the job also ended the stuck node's process.
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-f", stuck], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the stuck node's process outlived the job"
        time.sleep(1)


def test_sbatch_runs_a_users_experiment_from_the_wheel_through_config_dir(
    slurm_cluster: SlurmCluster, user_project: UserProject, data_cache: Path
) -> None:
    # The wheel's own pretrain.sh, submitted by hand from the user's project with Hydra's option
    # among the overrides; the job finds the venv's python (sbatch passes PATH on), composes the
    # arguments on cluster=slurm and freezes them in run.dir/job.yaml for the ranks.
    where = subprocess.run(
        [str(user_project.bin / "python"), "-c", "from zeroforge.launcher.slurm import SCRIPT; print(SCRIPT)"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    script = Path(where.stdout.strip())
    assert script.is_relative_to(user_project.venv), where.stdout + where.stderr
    run_dir = user_project.project / "runs" / "mine-on-slurm"
    run_dir.parent.mkdir(exist_ok=True)  # Slurm writes the log there, and makes no directory
    job_id = _submit(
        slurm_cluster,
        user_project.project,
        "--nodes=2",
        f"--output={run_dir.parent}/slurm-%j.out",
        str(script),
        "experiment=mine",
        "--config-dir",
        "myconf",
        *ONE_CPU_RANK_PER_NODE,
        f"data.cache_dir={data_cache}",
        f"run.dir={run_dir}",
        "logging.wandb.mode=disabled",
        path=user_project.bin,
    )
    job = slurm_cluster.wait_for_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=420)
    log = (run_dir.parent / f"slurm-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED", f"{job}\n{log[-4000:]}"
    assert "world size 2" in log
    written = OmegaConf.load(run_dir / "config.yaml")  # rewritten by the trainer on the first node
    assert written.run.name == "mine" and written.optim.lr == user_project.experiment["optim"]["lr"]
    assert written.cluster.name == "slurm" and written.cluster.nodes == 2 and written.system.slurm_job_id == job_id
    assert OmegaConf.load(run_dir / "job.yaml").optim.lr == user_project.experiment["optim"]["lr"]
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, 7))
    assert not list(user_project.project.glob("*.imported"))
