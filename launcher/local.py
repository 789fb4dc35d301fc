"""Local launch: validate, prepare the data, write the run directory, run torchrun, run the harness."""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
from typing import Sequence

from omegaconf import DictConfig

from zeroforge.launcher.estimate import Planner
from zeroforge.launcher.plan import check_fits
from zeroforge.launcher.preflight import preflight
from zeroforge.trainer.config import ClusterConfig, ConfigError
from zeroforge.trainer.entry import USER_ERROR_EXIT_CODE
from zeroforge.trainer.hang_report import newest_report, write_report
from zeroforge.trainer.preemption import REQUEUE_EXIT_CODE
from zeroforge.trainer.rundir import job_config_options, write_job_config, write_run_dir
from zeroforge.trainer.topology import accelerator_is_cuda
from zeroforge.trainer.validate import job_topology
from zeroforge.trainer.watchdog import HANG_EXIT_CODE, PENDING, hangs_dir

log = logging.getLogger("zeroforge")


def torchrun_command(cluster: ClusterConfig, job_config: Sequence[str]) -> list[str]:
    """The training command: torchrun (with the ranks' exit codes), the trainer on the frozen config."""
    return [
        sys.executable,
        "-m",
        "zeroforge.launcher.torchrun",
        # --standalone picks a free rendezvous port, so two local runs never collide.
        "--standalone",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(cluster.nproc_per_node),
        "-m",
        "zeroforge.trainer.train",
        *job_config,
    ]


def launch(cfg: DictConfig) -> int:
    """Train on this machine (or, with launcher.dry_run=true, print the torchrun command after the checks)."""
    if cfg.cluster.nodes != 1:
        raise ConfigError(
            f"cluster={cfg.cluster.name} runs on this machine alone, but cluster.nodes={cfg.cluster.nodes}; "
            "expected 1, or a Slurm cluster for several nodes (cluster=slurm, h100 or b200)."
        )
    topology = job_topology(cfg)
    if accelerator_is_cuda():  # the GPUs this machine has, whatever the cluster config says
        import torch

        if cfg.cluster.nproc_per_node > torch.cuda.device_count():
            raise ConfigError(
                f"cluster.nproc_per_node={cfg.cluster.nproc_per_node} but this machine has "
                f"{torch.cuda.device_count()} GPUs; expected at most one process per GPU."
            )
    if cfg.launcher.harness and cfg.eval.tasks:
        from zeroforge.trainer.lm_eval_tasks import select_tasks

        select_tasks(list(cfg.eval.tasks))  # a misspelt task is refused now, not after the training
    # The memory plan before the data is prepared: a job that cannot fit is refused in seconds.
    # The ranks read the hang timeout the plan sized (trainer/watchdog.py).
    cfg.cluster.hang_timeout_s = check_fits(Planner.of(cfg, topology)).hang_timeout_s
    dry_run = cfg.launcher.dry_run
    preflight(
        topology,
        run=cfg.run,
        checkpoint=cfg.checkpoint,
        model=cfg.model,
        data=cfg.data,
        deepspeed=cfg.deepspeed,
        cluster=cfg.cluster,
        seed=cfg.seed,
        prepare=not dry_run,
        force=cfg.launcher.force,
    )
    if dry_run:
        print(shlex.join(torchrun_command(cfg.cluster, job_config_options(cfg.run.dir))))
        return 0
    run_dir = write_run_dir(cfg)
    cmd = torchrun_command(cfg.cluster, write_job_config(cfg))
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    log.info("run directory %s", run_dir.resolve())
    log.info("launching: %s", " ".join(cmd))
    code = subprocess.call(cmd)
    if code == REQUEUE_EXIT_CODE:
        log.warning("training stopped on request after committing a checkpoint; run the same command to resume")
        return code
    if code == USER_ERROR_EXIT_CODE:
        return code  # a rank printed why, in one paragraph
    if code == HANG_EXIT_CODE or (code != 0 and (hangs_dir(run_dir) / PENDING).exists()):
        # The ranks' report, or where they were killed before writing it, one from their dumps.
        report = write_report(hangs_dir(run_dir)) or newest_report(hangs_dir(run_dir))
        log.error("training hung; %s", report.read_text().rstrip() if report else "no rank wrote a dump")
        return HANG_EXIT_CODE
    if code != 0:
        log.error("training exited with code %d; its log is above and in %s", code, run_dir)
        return code
    if cfg.launcher.harness:
        from zeroforge.trainer.evaluate import evaluate
        from zeroforge.trainer.generate import generate

        evaluate(cfg)
        generate(cfg)
    return 0
