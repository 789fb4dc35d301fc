"""The root config schema, its registration with Hydra, and composition for tests and tools."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
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
    ExportConfig,
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


class Scheduler(str, Enum):
    local = "local"  # torchrun on this machine
    slurm = "slurm"  # sbatch slurm/pretrain.sh


@dataclass
class ClusterConfig:
    name: str = "local"
    scheduler: Scheduler = Scheduler.local
    nodes: int = 1
    # Training processes per node (one per GPU); each node runs one torchrun that starts them.
    nproc_per_node: int = 1
    # Dense bf16 peak of one accelerator, for MFU; null: detected from the GPU, or unknown.
    peak_tflops: Optional[float] = None
    # Memory of one accelerator in GiB (what vendors call GB); null: unknown, the planner never refuses.
    gpu_memory_gb: Optional[float] = None
    # GPUs Slurm allocates per node (--gpus-per-node); 0 on CPU-only nodes.
    gpus_per_node: int = 0
    # Slurm placement; null: the site's default. time is Slurm's --time (e.g. 2-00:00:00).
    account: Optional[str] = None
    partition: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclude: Optional[str] = None
    time: str = "24:00:00"
    # Slurm warns the job this many seconds before its time limit; the run saves and requeues.
    warning_s: int = 300
    # A node that cannot join the rendezvous within this many seconds fails the job (not a hang).
    rendezvous_timeout_s: int = 300
    # Exported on every node before torchrun starts (NCCL and InfiniBand settings).
    env: dict[str, str] = field(default_factory=dict)
    # Passed verbatim to sbatch, for flags the fields above don't cover (e.g. --mem=0, --exclusive).
    sbatch_args: list[str] = field(default_factory=list)


@dataclass
class LauncherConfig:
    # Run held-out evaluation and sample generation on the export after training.
    harness: bool = True
    # Slurm: print the sbatch command and script instead of submitting.
    dry_run: bool = False
    # The pre-flight memory plan (launcher/plan.py): launch even when it says the job does not fit.
    force: bool = False
    # Model FLOPs utilisation assumed for the planned step time and time to the token budget.
    assumed_mfu: float = 0.4
    # The inference line of the plan: weights plus KV cache for this batch at this context
    # (null: model.max_position_embeddings).
    inference_batch_size: int = 1
    inference_context: Optional[int] = None


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
    export: ExportConfig = field(default_factory=ExportConfig)
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
