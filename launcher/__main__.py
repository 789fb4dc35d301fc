"""`zeroforge launch [options] [overrides]`: compose and validate the config, then run or submit the job.

cluster=local runs torchrun on this machine; a Slurm cluster (cluster=slurm, h100, b200) submits
slurm/pretrain.sh with sbatch. Either way the processes it starts read the config composed here
(frozen in run.dir/job.yaml), so --config-dir, hydra.searchpath and a config passed by path reach
every rank. With Hydra's `-m`, every sweep point is its own job and run directory.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from zeroforge.launcher.local import launch
from zeroforge.launcher.slurm import submit
from zeroforge.trainer.config import Scheduler
from zeroforge.trainer.entry import entry_point
from zeroforge.trainer.log import setup_logging


@entry_point
def main(cfg: DictConfig) -> int:
    setup_logging(0, cfg.logging.level)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(cfg.run.dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        # Sweep points must not share a run directory: the second would resume the first.
        run_dir = run_dir / hydra_cfg.job.override_dirname
    # Absolute, so that every process it starts (maybe on another node) finds the same directory.
    cfg.run.dir = str(run_dir.resolve())
    # A non-zero code ends a sweep: it goes on to its next point only after a success.
    return submit(cfg) if cfg.cluster.scheduler == Scheduler.slurm else launch(cfg)


if __name__ == "__main__":
    main()
