"""Inside a Slurm job, before any rank starts: `python -m zeroforge.launcher.job [overrides]`.

slurm/pretrain.sh runs this once on the batch host. It checks the config against the allocation,
prepares the data (once, so that ranks never race to build it), and writes the per-node settings
as shell `export` lines to the file named by $ZF_JOB_ENV, which the script then sources.
"""
from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path
from typing import Mapping

import hydra
from omegaconf import DictConfig

from zeroforge.launcher.preflight import preflight
from zeroforge.trainer.config import CONF_DIR, ConfigError
from zeroforge.trainer.entry import run_entry_point
from zeroforge.trainer.log import setup_logging

log = logging.getLogger("zeroforge")


def job_environment(cfg: DictConfig, env: Mapping[str, str]) -> dict[str, str]:
    """Check the config against this allocation, prepare the data; the variables every node needs.

    cluster.nodes is the allocation's node count here: pretrain.sh appends it to the overrides.
    """
    c = cfg.cluster
    plan = preflight(cfg, c.nodes * c.nproc_per_node)
    gpus = env.get("SLURM_GPUS_ON_NODE", "")
    if plan.device == "cuda" and gpus.isdigit() and c.nproc_per_node > int(gpus):
        raise ConfigError(
            f"cluster.nproc_per_node={c.nproc_per_node} processes per node, but Slurm gave each node "
            f"{gpus} GPUs; expected at most one process per GPU (sbatch --gpus-per-node, or cluster=h100 / b200)."
        )
    if plan.device == "cuda" and gpus.isdigit() and c.nproc_per_node < int(gpus):
        log.warning("Slurm gave each node %s GPUs but cluster.nproc_per_node=%d leaves some idle", gpus, c.nproc_per_node)
    return {
        "ZF_RUN_DIR": str(Path(cfg.run.dir).resolve()),
        "ZF_NPROC_PER_NODE": str(c.nproc_per_node),
        "ZF_RDZV_TIMEOUT": str(c.rendezvous_timeout_s),
        **{str(k): str(v) for k, v in c.env.items()},
    }


def write_exports(variables: Mapping[str, str], path: Path) -> None:
    path.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in variables.items()))


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup_logging(0, cfg.logging.level)
    target = os.environ.get("ZF_JOB_ENV")

    def run() -> None:
        if not target:
            raise ConfigError("ZF_JOB_ENV is not set; expected the file slurm/pretrain.sh sources the settings from.")
        write_exports(job_environment(cfg, os.environ), Path(target))

    run_entry_point(run)


if __name__ == "__main__":
    main()
