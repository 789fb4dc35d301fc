"""Local launch: validate, prepare the data, write the run directory, run torchrun, run the harness."""
from __future__ import annotations

import logging
import subprocess
import sys
from typing import Sequence

from omegaconf import DictConfig

from data.prepare import prepare
from data.shards import load_manifest
from launcher.config import ConfigError
from launcher.rundir import check_run_dir, write_run_dir
from launcher.validate import validate
from trainer.model import resolve_vocab_size

log = logging.getLogger("zeroforge")


def torchrun_command(cfg: DictConfig, overrides: Sequence[str]) -> list[str]:
    """The training command; the trainer composes the same config from the same overrides."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        # --standalone picks a free rendezvous port, so two local runs never collide.
        "--standalone", "--nnodes", "1", "--nproc_per_node", str(cfg.cluster.nproc_per_node),
        "-m", "trainer.train", *overrides,
    ]


def launch(cfg: DictConfig, overrides: Sequence[str]) -> int:
    if cfg.cluster.name != "local" or cfg.cluster.nodes != 1:
        raise ConfigError(
            f"cluster={cfg.cluster.name} with cluster.nodes={cfg.cluster.nodes}: this launcher runs "
            "cluster=local on one node; on Slurm, submit slurm/pretrain.sh with sbatch."
        )
    plan = validate(cfg, cfg.cluster.nodes * cfg.cluster.nproc_per_node)
    if plan.device == "cuda":
        import torch

        if cfg.cluster.nproc_per_node > torch.cuda.device_count():
            raise ConfigError(
                f"cluster.nproc_per_node={cfg.cluster.nproc_per_node} but this machine has "
                f"{torch.cuda.device_count()} GPUs; expected at most one process per GPU."
            )
    check_run_dir(cfg)
    # Prepared here, once, so data errors show before any process starts and ranks never race.
    manifest = load_manifest(prepare(cfg.data))
    resolve_vocab_size(cfg.model, manifest["vocab_size"])
    run_dir = write_run_dir(cfg)
    cmd = torchrun_command(cfg, overrides)
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    log.info("run directory %s", run_dir.resolve())
    log.info("launching: %s", " ".join(cmd))
    code = subprocess.call(cmd)
    if code != 0:
        log.error("training exited with code %d; its log is above and in %s", code, run_dir)
        return code
    if cfg.launcher.harness:
        from trainer.evaluate import evaluate
        from trainer.generate import generate

        evaluate(cfg)
        generate(cfg)
    return 0
