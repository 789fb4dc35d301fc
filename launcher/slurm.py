"""Slurm submission: validate, write the run directory, then `sbatch slurm/pretrain.sh`.

The job gets the config the launcher composed, frozen in run.dir/job.yaml (trainer/rundir.py), so
it runs what was validated here even when the user's config files change while it waits.
"""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from zeroforge.launcher.estimate import Planner
from zeroforge.launcher.plan import check_fits
from zeroforge.launcher.preflight import preflight
from zeroforge.trainer.config import ClusterConfig, ConfigError, RunSection
from zeroforge.trainer.rundir import job_config_options, write_job_config, write_run_dir
from zeroforge.trainer.validate import job_topology, slurm_time_limit_s

log = logging.getLogger("zeroforge")

SCRIPT = Path(__file__).resolve().parent.parent / "slurm" / "pretrain.sh"


def sbatch_command(c: ClusterConfig, run: RunSection, job_config: Sequence[str]) -> list[str]:
    """The exact sbatch call: the cluster config's placement, then the frozen config for the job."""
    run_dir = Path(run.dir).resolve()
    cmd = [
        "sbatch",
        f"--job-name={run.name}",
        f"--nodes={c.nodes}",
        f"--gpus-per-node={c.gpus_per_node}",
        f"--time={c.time}",
        f"--signal=B:USR1@{c.warning_s}",
        f"--output={run_dir}/logs/slurm-%j.out",
    ]
    cmd += [f"--{key}={getattr(c, key)}" for key in ("account", "partition", "qos", "constraint", "exclude") if getattr(c, key)]
    cmd += list(c.sbatch_args)
    return [*cmd, str(SCRIPT), *job_config]


def check_time_limit(c: ClusterConfig) -> None:
    """A limit no longer than the warning gets the warning as the job starts, which then dies with
    an empty log: Slurm's USR1 arrives before the script can handle it. The time's format was
    checked with the other fields (validate())."""
    limit = slurm_time_limit_s(str(c.time))
    if limit is not None and limit <= c.warning_s:
        raise ConfigError(
            f"cluster.time={c.time} ({limit} s) must be longer than cluster.warning_s={c.warning_s}: Slurm "
            "signals the job that many seconds before its time limit, here as soon as it starts; "
            "raise cluster.time or lower cluster.warning_s."
        )


def submit(cfg: DictConfig) -> int:
    """Submit one job (or, with launcher.dry_run=true, print what would be submitted)."""
    topology = job_topology(cfg)
    check_time_limit(cfg.cluster)
    # Before the queue, not after hours in it; the ranks read the hang timeout the plan sized
    # (trainer/watchdog.py).
    cfg.cluster.hang_timeout_s = check_fits(Planner.of(cfg, topology)).hang_timeout_s
    # The job prepares its data once it starts.
    preflight(
        topology,
        run=cfg.run,
        checkpoint=cfg.checkpoint,
        model=cfg.model,
        data=cfg.data,
        deepspeed=cfg.deepspeed,
        cluster=cfg.cluster,
        seed=cfg.seed,
        prepare=False,
    )
    if cfg.launcher.dry_run:
        cmd = sbatch_command(cfg.cluster, cfg.run, job_config_options(cfg.run.dir))
        print(shlex.join(cmd))
        print(f"----- {SCRIPT} -----")
        print(SCRIPT.read_text(), end="")
        return 0
    run_dir = write_run_dir(cfg)
    cmd = sbatch_command(cfg.cluster, cfg.run, write_job_config(cfg))
    (run_dir / "logs").mkdir(exist_ok=True)
    (run_dir / "sbatch.txt").write_text(shlex.join(cmd) + "\n")
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise ConfigError(
            f"cluster={cfg.cluster.name} submits with sbatch, which is not on PATH; run this on a Slurm login node, or use cluster=local."
        ) from None
    if result.returncode != 0:
        raise ConfigError(f"sbatch refused the job (exit code {result.returncode}): {result.stderr.strip()}")
    match = re.search(r"Submitted batch job (\d+)", result.stdout)
    job_id = match.group(1) if match else result.stdout.strip()
    log.info("submitted job %s; logs in %s/logs/slurm-%s.out", job_id, run_dir.resolve(), job_id)
    print(job_id, flush=True)
    return 0
