"""The run directory: what a run needs to be understood later, written before it starts."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from launcher.config import ConfigError


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def run_dir_override(cfg: DictConfig) -> str:
    """`run.dir=<absolute path>` for a child process, quoted so that any path survives Hydra's parser."""
    path = str(Path(cfg.run.dir).resolve()).replace("'", "\\'")
    return f"run.dir='{path}'"


def write_run_dir(cfg: DictConfig) -> Path:
    """Create run.dir and write the resolved config (with the code version) as config.yaml."""
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    resolved["code_version"] = git_commit()
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(OmegaConf.to_yaml(resolved))
    tmp.replace(run_dir / "config.yaml")
    return run_dir


def check_run_dir(cfg: DictConfig) -> None:
    """One run per directory: a run.dir with metrics is only re-entered to resume a checkpoint."""
    from trainer.checkpoint import committed_checkpoints

    metrics = Path(cfg.run.dir) / "metrics.jsonl"
    resumable = cfg.checkpoint.resume != "never" and committed_checkpoints(cfg.checkpoint.dir)
    if metrics.exists() and not resumable:
        raise ConfigError(
            f"run.dir={cfg.run.dir} already holds a run ({metrics} exists) with no committed checkpoint "
            f"to resume (checkpoint.resume={cfg.checkpoint.resume}); expected a new directory: set "
            "another run.name or run.dir, or remove that directory."
        )
