"""The root config schema, its registration with Hydra, and composition for tests and tools."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from data.config import DataConfig
from trainer.config import (
    CheckpointConfig,
    DeepSpeedConfig,
    EvalConfig,
    GenerateConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


class ConfigError(ValueError):
    """A configuration a user wrote that cannot run; the message names what and why."""


@dataclass
class RunSection:
    name: str = "default"
    dir: str = "runs/${run.name}"


@dataclass
class ClusterConfig:
    name: str = "local"
    nodes: int = 1
    nproc_per_node: int = 1
    # Dense bf16 peak of one accelerator, for MFU; null: detected from the GPU, or unknown.
    peak_tflops: Optional[float] = None


@dataclass
class LauncherConfig:
    # Run held-out evaluation and sample generation on the export after training.
    harness: bool = True


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    seed: int = 1234
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore; conf/config.yaml lists it first in its defaults."""
    ConfigStore.instance().store(name="zeroforge_schema", node=Config)


register_configs()


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose conf/ like the entry points do; for tests and tools that call train(cfg) directly."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))
