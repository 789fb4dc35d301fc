"""`zeroforge universal [overrides]` (or `python -m zeroforge.launcher.universal`): convert the
checkpoint a run resumes from (checkpoint.resume) to DeepSpeed's universal form, which any world
size loads, as `zeroforge launch` and the Slurm job do before the ranks start. For ranks started
by torchrun or srun directly, which never convert (trainer/universal.py); run it with the
overrides of the run, on a node with cluster.host_memory_gb of memory."""

from __future__ import annotations

from omegaconf import DictConfig

from zeroforge.launcher.preflight import convert_for_resume
from zeroforge.trainer.checkpoint import newest_checkpoint
from zeroforge.trainer.config import ConfigError
from zeroforge.trainer.entry import entry_point
from zeroforge.trainer.log import setup_logging
from zeroforge.trainer.universal import converts


@entry_point
def main(cfg: DictConfig) -> None:
    setup_logging(0, cfg.logging.level)
    c, ds = cfg.checkpoint, cfg.deepspeed
    path = newest_checkpoint(c.dir, c.resume)
    if path is None:
        raise ConfigError(f"checkpoint.resume={c.resume} finds no committed checkpoint in {c.dir}; expected one to convert.")
    if not converts(ds):
        raise ConfigError(
            f"deepspeed={ds.name} (ZeRO-{ds.stage}{' with offload' if ds.stage else ''}): its checkpoints are never converted; "
            "expected ZeRO 1-3 without offload. ZeRO-0's load on any world size as they are, ZeRO-Offload's resume "
            "only on the world size that saved them."
        )
    print(convert_for_resume(path, cluster=cfg.cluster, checkpoint=c, force=cfg.launcher.force))


if __name__ == "__main__":
    main()
