"""`zeroforge launch [overrides]`: compose and validate the config, then run or submit the job.

cluster=local runs torchrun on this machine; a Slurm cluster (cluster=slurm, h100, b200) submits
slurm/pretrain.sh with sbatch. With Hydra's `-m`, every sweep point is its own job and run directory.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from zeroforge.launcher.local import launch
from zeroforge.launcher.slurm import submit
from zeroforge.trainer.config import CONF_DIR, Scheduler
from zeroforge.trainer.entry import run_entry_point
from zeroforge.trainer.log import setup_logging


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup_logging(0, cfg.logging.level)
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        # Sweep points must not share a run directory: the second would resume the first.
        cfg.run.dir = str(Path(cfg.run.dir) / hydra_cfg.job.override_dirname)
    run = submit if cfg.cluster.scheduler == Scheduler.slurm else launch
    code = run_entry_point(lambda: run(cfg, list(hydra_cfg.overrides.task)))
    if code:
        sys.exit(code)  # a sweep goes on to its next point only after a success


if __name__ == "__main__":
    main()
