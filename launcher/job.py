"""Inside a Slurm job, before any rank starts: `python -m zeroforge.launcher.job [options] [overrides]`.

slurm/pretrain.sh runs this once on the batch host with the script's own arguments: the frozen
config of `zeroforge launch` (--config-path/--config-name), or a user's overrides and options
(`sbatch slurm/pretrain.sh --config-dir ./myconf experiment=mine`), composed on the generic
cluster=slurm unless they choose a cluster. It sets cluster.nodes to the allocation's node count,
checks the config against the allocation, prepares the data (once, so that ranks never race to
build it), converts the checkpoint a resume on another world size continues from (here on the
batch host, which has its node's memory to itself before srun starts the ranks; not on the login
node at submission), freezes the config into run.dir/job.yaml for the ranks, and writes the per-node
settings as shell `export` lines to the file named by $ZF_JOB_ENV, which the script then sources.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Mapping, Sequence

from omegaconf import DictConfig

from zeroforge.data.config import plain
from zeroforge.launcher.preflight import preflight
from zeroforge.launcher.slurm import SCRIPT
from zeroforge.trainer.config import ConfigError
from zeroforge.trainer.entry import entry_point
from zeroforge.trainer.log import setup_logging
from zeroforge.trainer.preemption import REQUEUE_EXIT_CODE
from zeroforge.trainer.rundir import JOB_CONFIG, read_job_config, write_job_config
from zeroforge.trainer.validate import job_topology
from zeroforge.trainer.watchdog import HANG_EXIT_CODE

log = logging.getLogger("zeroforge")


def job_arguments(args: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """The script's arguments, on cluster=slurm unless they choose a cluster or a whole config,
    with the allocation's node count last (so that it wins)."""
    chosen = any(a.startswith(("cluster=", "--config-name", "-cn")) for a in args)
    nodes = [f"cluster.nodes={env['SLURM_JOB_NUM_NODES']}"] if "SLURM_JOB_NUM_NODES" in env else []
    return [*([] if chosen else ["cluster=slurm"]), *args, *nodes]


def job_environment(cfg: DictConfig, env: Mapping[str, str]) -> dict[str, str]:
    """Check the config against this allocation, prepare the data, convert a checkpoint saved by
    another world size, freeze the config for the ranks; the variables every node needs."""
    c = cfg.cluster
    topology = job_topology(cfg)
    preflight(
        topology,
        run=cfg.run,
        checkpoint=cfg.checkpoint,
        model=cfg.model,
        data=cfg.data,
        deepspeed=cfg.deepspeed,
        cluster=c,
        seed=cfg.seed,
        force=cfg.launcher.force,
    )
    gpus = env.get("SLURM_GPUS_ON_NODE", "")
    if topology.device == "cuda" and gpus.isdigit() and c.nproc_per_node > int(gpus):
        raise ConfigError(
            f"cluster.nproc_per_node={c.nproc_per_node} processes per node, but Slurm gave each node "
            f"{gpus} GPUs; expected at most one process per GPU (sbatch --gpus-per-node, or cluster=h100 / b200)."
        )
    if topology.device == "cuda" and gpus.isdigit() and c.nproc_per_node < int(gpus):
        log.warning("Slurm gave each node %s GPUs but cluster.nproc_per_node=%d leaves some idle", gpus, c.nproc_per_node)
    write_job_config(cfg)
    return {
        "ZF_RUN_DIR": str(Path(cfg.run.dir).resolve()),
        "ZF_JOB_CONFIG": JOB_CONFIG,
        "ZF_NPROC_PER_NODE": str(c.nproc_per_node),
        "ZF_RDZV_TIMEOUT": str(c.rendezvous_timeout_s),
        "ZF_MAX_HANG_REQUEUES": str(c.max_hang_requeues),
        # For the script's own way out where Slurm refuses to requeue the job.
        "ZF_SCRIPT": str(SCRIPT),
        "ZF_REQUEUE_EXIT_CODE": str(REQUEUE_EXIT_CODE),
        "ZF_HANG_EXIT_CODE": str(HANG_EXIT_CODE),
        **{str(k): str(v) for k, v in c.env.items()},
    }


def write_exports(variables: Mapping[str, str], path: Path) -> None:
    path.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in variables.items()))


def first_config(cfg: DictConfig, env: Mapping[str, str]) -> DictConfig:
    """The config a requeued job runs: the one its first start froze in run.dir/job.yaml, on this
    allocation's node count. Composed again from the script's arguments, it would pick up edits
    made to the config files since, and change the run half-way (the resume check compares only
    what makes a checkpoint unusable: model, tokenizer, data, seq_len, seed)."""
    cfg.run.dir = str(Path(cfg.run.dir).resolve())  # as job.yaml holds it
    job_config = Path(cfg.run.dir) / f"{JOB_CONFIG}.yaml"
    if int(env.get("SLURM_RESTART_COUNT") or 0) == 0 or not job_config.exists():
        return cfg
    frozen = read_job_config(cfg.run.dir)
    frozen.cluster.nodes = cfg.cluster.nodes
    now, then = (flat(plain(c)) for c in (cfg, frozen))
    changed = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))
    if changed:
        log.warning(
            "requeued job: the config files changed since the job first started (%s); it goes on with the "
            "config it started with, frozen in %s",
            ", ".join(changed),
            job_config,
        )
    return frozen


def flat(values: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} as {"a.b": 1}."""
    out: dict[str, object] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@entry_point
def main(cfg: DictConfig) -> None:
    setup_logging(0, cfg.logging.level)
    target = os.environ.get("ZF_JOB_ENV")
    if not target or "SLURM_JOB_NUM_NODES" not in os.environ:
        raise ConfigError("ZF_JOB_ENV or SLURM_JOB_NUM_NODES is not set; expected to run inside slurm/pretrain.sh in a Slurm job.")
    write_exports(job_environment(first_config(cfg, os.environ), os.environ), Path(target))


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *job_arguments(sys.argv[1:], os.environ)]
    main()
