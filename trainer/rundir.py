"""The run directory: what a run needs to be understood later, written before it starts."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, cast

from omegaconf import DictConfig, OmegaConf

from zeroforge.data.config import plain
from zeroforge.trainer.config import AnyConfig, CheckpointConfig, Config, ConfigError, RunSection


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def library_versions() -> dict[str, Optional[str]]:
    """Read from the installed distributions' metadata: no import of the (slow to load) libraries."""
    versions: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in ("zeroforge", "torch", "deepspeed", "transformers", "datasets"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def system_facts(probe_gpu: bool) -> dict[str, Any]:
    """Where the run ran: the trainer rewrites config.yaml on its first rank, so a run submitted
    from a login node records the node it trained on. Only the trainer asks CUDA about its GPUs:
    in the launcher that would hold a context, and GPU memory, for the whole run."""
    import torch

    gpus = torch.cuda.device_count() if probe_gpu and torch.cuda.is_available() else 0
    return {
        "hostname": socket.gethostname(),
        "gpu": (torch.cuda.get_device_name(0) if gpus else "cpu") if probe_gpu else None,
        "gpu_count": gpus if probe_gpu else None,  # visible on this node
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "versions": library_versions(),
    }


# run.dir/job.yaml: the composed config that every process the launcher starts reads.
JOB_CONFIG = "job"


def job_config_options(run_dir: str | Path) -> list[str]:
    """The Hydra options that make an entry point compose run_dir/job.yaml instead of conf/."""
    return ["--config-path", str(Path(run_dir).resolve()), "--config-name", JOB_CONFIG]


def _escaped(value: Any) -> Any:
    """Resolved values with every `${` escaped again, so that a string the user escaped (a prompt
    `echo \\${HOME}`) stays a string when job.yaml is composed, not an interpolation."""
    if isinstance(value, dict):
        return {k: _escaped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escaped(v) for v in value]
    return value.replace("${", "\\${") if isinstance(value, str) else value


def write_job_config(cfg: DictConfig) -> list[str]:
    """Freeze the composed config into run.dir/job.yaml; returns the Hydra options that load it.

    The ranks (and a Slurm job, maybe hours later) then see exactly what the launcher validated,
    however it was composed (--config-dir, hydra.searchpath, a config passed by path), and the
    user's config files need not exist on the nodes nor stay unchanged while the job waits.
    Interpolations are resolved against an absolute run.dir. The schema comes first, so the
    values are type-checked again; the hydra settings are conf/config.yaml's for a single run.
    """
    run_dir = Path(cfg.run.dir).resolve()
    values = plain(cfg, resolve=False)
    values["run"]["dir"] = str(run_dir)
    document = {
        "defaults": [
            "zeroforge_schema",
            {"override hydra/job_logging": "none"},
            {"override hydra/hydra_logging": "none"},
            "_self_",
        ],
        "hydra": {"run": {"dir": "."}, "output_subdir": None, "job": {"chdir": False}},
        **_escaped(OmegaConf.to_container(OmegaConf.create(values), resolve=True)),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f"{JOB_CONFIG}.yaml.tmp"
    tmp.write_text("# Written by zeroforge launch: every rank of this run composes this config.\n" + OmegaConf.to_yaml(document))
    tmp.replace(run_dir / f"{JOB_CONFIG}.yaml")
    return job_config_options(run_dir)


def read_job_config(run_dir: str | Path) -> DictConfig:
    """run_dir/job.yaml as the typed config it froze (what composing it gives, without Hydra)."""
    frozen = OmegaConf.load(Path(run_dir) / f"{JOB_CONFIG}.yaml")
    values = {k: v for k, v in frozen.items() if k not in ("defaults", "hydra")}
    cfg = OmegaConf.merge(OmegaConf.structured(Config), values)
    OmegaConf.set_struct(cfg, True)
    return cast(DictConfig, cfg)


def write_run_dir(cfg: AnyConfig, probe_gpu: bool = False) -> Path:
    """Create run.dir and write the resolved config (with the code version and the system) as config.yaml.

    probe_gpu: record the GPU (the trainer, where CUDA is in use anyway)."""
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = plain(cfg)
    resolved["code_version"] = git_commit()
    resolved["system"] = system_facts(probe_gpu)
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(OmegaConf.to_yaml(resolved))
    tmp.replace(run_dir / "config.yaml")
    return run_dir


def check_run_dir(run: RunSection, checkpoint: CheckpointConfig) -> None:
    """One run per directory: a run.dir with metrics is only re-entered to resume a checkpoint."""
    from zeroforge.trainer.checkpoint import committed_checkpoints, interrupted_resaves

    metrics = Path(run.dir) / "metrics.jsonl"
    resumable = checkpoint.resume != "never" and (committed_checkpoints(checkpoint.dir) or interrupted_resaves(checkpoint.dir))
    if metrics.exists() and not resumable:
        raise ConfigError(
            f"run.dir={run.dir} already holds a run ({metrics} exists) with no committed checkpoint "
            f"to resume (checkpoint.resume={checkpoint.resume}); expected a new directory: set "
            "another run.name or run.dir, or remove that directory."
        )
