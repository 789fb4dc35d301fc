"""A Slurm job whose rank hangs ends, requeues without the stuck node and finishes from its last
checkpoint (slurm/pretrain.sh, launcher/hang_requeue.py), on the three-node test cluster."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import psutil
import pytest

from tests.conftest import read_metrics
from tests.slurm.cluster import SlurmCluster
from tests.slurm.test_pretrain import ONE_CPU_RANK_PER_NODE, SCRIPT, _submit, _wait_for_step

pytestmark = pytest.mark.slow

HANG_TIMEOUT_S = 10
STEPS = 12
EVERY = 4


def _rank_on_second_node(job_id: str) -> psutil.Process:
    """The job's trainer process that Slurm started on its second node (all nodes are this host)."""
    for process in psutil.process_iter(["cmdline"]):
        try:
            cmdline = process.info["cmdline"] or []
            module = cmdline[cmdline.index("-m") + 1] if "-m" in cmdline else None
            env = process.environ()
            if module == "zeroforge.trainer.train" and env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_NODEID") == "1":
                return process
        except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
            continue
    raise AssertionError(f"no trainer of job {job_id} on its second node")


def test_a_hung_rank_requeues_the_job_without_its_node_and_the_run_finishes(
    slurm_cluster: SlurmCluster, data_cache: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    job_id = _submit(
        slurm_cluster,
        tmp_path,
        "--nodes=2",
        f"--output={tmp_path}/slurm-%j.out",
        str(SCRIPT),
        "experiment=smoke",
        f"data.cache_dir={data_cache}",
        f"run.dir={run_dir}",
        "logging.wandb.mode=offline",
        "eval.every=0",
        "logging.every=1",
        f"checkpoint.every={EVERY}",
        f"train.steps={STEPS}",
        f"cluster.hang_timeout_s={HANG_TIMEOUT_S}",
        *ONE_CPU_RANK_PER_NODE,
    )
    _wait_for_step(run_dir, EVERY + 2, slurm_cluster, job_id)
    stopped = _rank_on_second_node(job_id)
    stuck, rank = stopped.environ()["SLURMD_NODENAME"], stopped.environ()["RANK"]  # the rendezvous orders the ranks
    stopped.send_signal(signal.SIGSTOP)

    job = slurm_cluster.rerun_requeued(job_id)
    log = (run_dir / "logs" / f"slurm-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", f"{job}\n{log[-4000:]}"
    assert job["ExcNodeList"] == stuck and stuck not in slurm_cluster.command("scontrol", "show", "hostnames", job["NodeList"]).split(), job
    # The job's log and the report name the node; the requeue is counted against the limit.
    assert f"stuck: rank {rank} on {stuck}" in log and f"hosts to exclude: {stuck}" in log, log[-4000:]
    assert f"requeueing it without {stuck} (1 of cluster.max_hang_requeues=2)" in log, log[-4000:]
    # One report: the stopped rank, continued by Slurm to be ended, reports nothing more.
    (report,) = (run_dir / "hangs").glob("*.json")
    assert json.loads(report.read_text())["stuck_hosts"] == [stuck]
    # Resumed from the last committed checkpoint (step 4, or 8 where the rank ran on before it
    # stopped), then every step to the end; one wandb run.
    resumed_from = re.search(r"resumed from \S+ \(step (\d+)\)", log.split(f"job {job_id} (restart 1)")[1])
    assert resumed_from and int(resumed_from.group(1)) in (EVERY, 2 * EVERY), log[-4000:]
    # Each step once in metrics.jsonl (records of steps after the checkpoint, where the first attempt
    # logged any, are set aside in metrics.superseded.jsonl).
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, STEPS + 1))
    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and {p.name.rsplit("-", 1)[1] for p in attempts} == {(run_dir / "wandb_id").read_text().strip()}
