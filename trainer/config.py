"""The config schema: one typed dataclass per section, the root `Config` registered with Hydra,
and `ConfigError`. It sits below the launcher and the trainer, which both read it; the data
section's own schema is `zeroforge.data.config`.

Hydra checks every key and type; a field's rule (range or choices) is its metadata, which
`validate()` (trainer/validate.py) checks before anything runs: "min"/"max" inclusive,
"above"/"below" exclusive, "choices" (with "ignore_case"), "each" for every element of a list, and
"slurm_time" for a Slurm --time value. Rules between fields live in validate().
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional, Sequence, Union, cast

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from zeroforge.data.config import DataConfig

# conf/ beside the packages: in the checkout, and in an installed zeroforge (package data).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


class ConfigError(ValueError):
    """A configuration a user wrote that cannot run; the message names what and why."""


class Precision(str, Enum):
    auto = "auto"  # bf16 on a GPU, fp32 on the CPU
    bf16 = "bf16"
    fp32 = "fp32"


class TrainPrecision(str, Enum):
    auto = "auto"  # bf16 on a GPU, fp32 on the CPU
    bf16 = "bf16"
    fp32 = "fp32"
    # bf16, with the decoder's linear layers computed in float8 (torchao; trainer/fp8.py)
    fp8 = "fp8"


class Compile(str, Enum):
    off = "off"  # eager
    regional = "regional"  # each decoder block compiled in place (module.compile()): names stay plain
    full = "full"  # the whole model, through DeepSpeed's engine.compile()


class Loss(str, Enum):
    auto = "auto"  # chunked where it is exact for the model type (trainer/loss.py), else plain
    chunked = "chunked"  # one chunk of tokens' fp32 logits at a time, gradients computed in the forward
    plain = "plain"  # F.cross_entropy over the whole [tokens, vocab] fp32 logits
    liger = "liger"  # Liger's fused linear cross-entropy (Triton; needs liger-kernel and a CUDA GPU)


class Schedule(str, Enum):
    cosine = "cosine"  # linear warmup, then cosine down to min_lr_ratio * lr
    wsd = "wsd"  # warmup, stable, then linear decay over decay_fraction of the steps
    constant = "constant"  # linear warmup, then flat


@dataclass
class ModelConfig:
    # The shape is set by each conf/model/*.yaml, and only there.
    name: str = MISSING
    # Any model type transformers' AutoConfig knows; the fields below are mapped onto it.
    model_type: str = MISSING
    hidden_size: int = field(default=MISSING, metadata={"min": 1})
    num_layers: int = field(default=MISSING, metadata={"min": 1})
    num_heads: int = field(default=MISSING, metadata={"min": 1})
    num_kv_heads: int = field(default=MISSING, metadata={"min": 1})
    intermediate_size: int = field(default=MISSING, metadata={"min": 1})
    max_position_embeddings: int = field(default=MISSING, metadata={"min": 1})
    # null: the tokenizer's vocabulary, rounded up to a multiple of 64.
    vocab_size: Optional[int] = field(default=None, metadata={"min": 1})
    tie_word_embeddings: bool = False
    # sdpa picks its flash backend on a GPU in bf16 without a padding mask; flash_attention_2
    # needs the flash-attn package (and reads packed position ids, see data.reset_position_ids).
    attn_implementation: str = field(
        default="sdpa", metadata={"choices": ["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"]}
    )
    activation_checkpointing: bool = False
    # off (default: exact), regional (recommended on GPUs: every decoder block compiled in place,
    # one compilation shared by all blocks) or full (the whole model through DeepSpeed).
    compile: Compile = Compile.off
    # Liger's Triton kernels for RMSNorm, SwiGLU and RoPE (pip install liger-kernel; CUDA only),
    # patched into this model instance; off by default, since they are not bit-exact.
    liger_kernels: bool = False
    # Long sequences: each decoder layer's MLP a slice of the sequence at a time (DeepSpeed's
    # TiledMLP; trainer/tiled_mlp.py), at the cost of its forward again in the backward.
    tiled_mlp: bool = False
    # Passed verbatim to AutoConfig.for_model, for fields the common ones above don't cover.
    extra: dict[str, Any] = field(default_factory=dict)
    # Continued pre-training: an HF causal LM (export directory or hub name) whose weights start
    # the run, with a fresh optimizer and data position. Its shape must be the one above, and the
    # data must be tokenized with its tokenizer (data.tokenizer=<the same path or name>).
    init_from: Optional[str] = None


@dataclass
class OptimConfig:
    name: str = "adamw_cosine"
    lr: float = field(default=4e-3, metadata={"above": 0})
    min_lr_ratio: float = field(default=0.1, metadata={"min": 0, "max": 1})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95], metadata={"each": {"min": 0, "below": 1}})
    eps: float = field(default=1e-8, metadata={"above": 0})
    weight_decay: float = field(default=0.1, metadata={"min": 0})
    grad_clip: float = field(default=1.0, metadata={"min": 0})
    # torch's fused AdamW kernel (one launch for all parameters); null: fused on CUDA, torch's
    # default (foreach) elsewhere. Skipping a bad step works the same either way (trainer/faults.py).
    fused: Optional[bool] = None
    schedule: Schedule = Schedule.cosine
    warmup_steps: int = field(default=20, metadata={"min": 0})
    decay_fraction: float = field(default=0.2, metadata={"min": 0, "max": 1})


@dataclass
class DeepSpeedConfig:
    name: str = "zero2"
    stage: int = field(default=2, metadata={"choices": [0, 1, 2, 3]})
    offload_optimizer: bool = False
    offload_params: bool = False
    # ZeRO-3 only: build the model partitioned (deepspeed.zero.Init, trainer/partitioned.py), so each
    # rank materialises only its shard; false builds the whole fp32 model on every rank first.
    zero_init: bool = True
    # Merged verbatim into DeepSpeed's zero_optimization section (bucket sizes, overlap_comm, ...).
    zero_extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParallelConfig:
    # Ranks that split each sample's sequence (Ulysses), each layer's matrices (AutoTP) and the
    # experts (AutoEP); their product divides the world size, and the data-parallel size is the
    # world size over sequence x tensor (trainer/topology.py). Each is 1 until its issue lands.
    sequence: int = field(default=1, metadata={"min": 1})
    tensor: int = field(default=1, metadata={"min": 1})
    expert: int = field(default=1, metadata={"min": 1})


@dataclass
class TrainConfig:
    steps: int = field(default=700, metadata={"min": 1})
    micro_batch_size: int = field(default=16, metadata={"min": 1})
    global_batch_size: int = field(default=16, metadata={"min": 1})
    precision: TrainPrecision = TrainPrecision.auto
    # train.precision=fp8: torchao's scaling of each float8 cast, tensorwise (one scale a tensor,
    # the fastest) or rowwise (one scale a row: more accurate, a little slower).
    fp8_recipe: str = field(default="tensorwise", metadata={"choices": ["tensorwise", "rowwise"]})
    # Save a checkpoint and stop after every this many steps (as Megatron-LM's --exit-interval):
    # a job that must end inside a time limit resumes where it stopped.
    exit_interval: Optional[int] = field(default=None, metadata={"min": 1})
    # A step whose loss or gradient norm is not finite is skipped (weights untouched); this many
    # skipped steps in a row stop the run (trainer/faults.py).
    max_consecutive_skips: int = field(default=5, metadata={"min": 1})
    # Loss-spike guard, off when null: skip a step whose loss is more than this many standard
    # deviations above the mean of the last spike_window accepted steps.
    spike_zscore: Optional[float] = field(default=None, metadata={"above": 0})
    spike_window: int = field(default=100, metadata={"min": 2})
    # The next-token loss (trainer/loss.py). chunked equals plain (to fp32 rounding) without the
    # whole vocabulary's fp32 logits; auto takes it where the model type's logits are a plain
    # output layer of the hidden states.
    loss: Loss = Loss.auto
    # Tokens per chunk of the chunked loss: its fp32 logits are chunk x vocabulary x 4 bytes
    # (0.5 GiB at 1,024 x 128,256), and each chunk's matmuls stay large enough for a GPU.
    loss_chunk_tokens: int = field(default=1024, metadata={"min": 1})


@dataclass
class WandbConfig:
    # auto: online when credentials exist, offline otherwise; disabled: no wandb at all.
    mode: str = field(default="auto", metadata={"choices": ["auto", "online", "offline", "disabled"]})
    project: str = "zeroforge"
    entity: Optional[str] = None


@dataclass
class LoggingConfig:
    name: str = "default"
    every: int = field(default=10, metadata={"min": 1})
    # A rank whose own time (compute and data, not waiting for other ranks) over the last
    # straggler_intervals logging intervals exceeds this many times the median rank's is named
    # (trainer/stragglers.py); null: no rank is timed or named.
    straggler_factor: Optional[float] = field(default=1.5, metadata={"above": 1})
    straggler_intervals: int = field(default=3, metadata={"min": 1})
    # A mixture of experts: an expert that receives no token for this many logging intervals in a
    # row is warned about (trainer/routing.py).
    dead_expert_intervals: int = field(default=3, metadata={"min": 1})
    level: str = field(default="INFO", metadata={"choices": ["DEBUG", "INFO", "WARNING", "ERROR"], "ignore_case": True})
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    # 0: only at the end of training.
    every: int = field(default=0, metadata={"min": 0})
    dir: str = "${run.dir}/checkpoints"
    # auto: continue from the newest committed checkpoint in dir, if any; never; or a checkpoint path.
    resume: str = "auto"
    # Retention, applied after each commit: the newest keep_last, plus every keep_every-th step.
    keep_last: int = field(default=3, metadata={"min": 1})
    keep_every: Optional[int] = field(default=None, metadata={"min": 1})
    # Write checkpoint files from a background thread while training goes on; the loop waits only
    # for a copy of the state in host memory, and the checkpoint commits after the next step.
    async_save: bool = False
    export_dir: str = "${run.dir}/export"
    # Seconds the conversion to DeepSpeed's universal form (resume on another world size, before
    # the ranks start) may take; null: 4x the plan's estimate, at least 10 min (trainer/universal.py).
    universal_timeout_s: Optional[int] = field(default=None, metadata={"min": 1})


@dataclass
class EvalConfig:
    # 0: no validation (and no sample generations) inside the training loop.
    every: int = field(default=0, metadata={"min": 0})
    batch_size: int = field(default=8, metadata={"min": 1})
    batches: int = field(default=8, metadata={"min": 1})
    # An HF export directory, a DeepSpeed checkpoint step_<N> directory, or a checkpoints
    # directory (its `latest`); checkpoints are consolidated on the fly.
    model_path: str = "${checkpoint.export_dir}"
    # auto: bf16 on a GPU, fp32 on the CPU.
    precision: Precision = Precision.auto
    # lm-evaluation-harness tasks: its task names, or paths of task YAMLs (a file, or a directory of
    # them); run through its HF adapter when the eval extra is installed.
    tasks: list[str] = field(default_factory=list)
    # At most this many examples per task (null: all).
    tasks_limit: Optional[int] = field(default=None, metadata={"min": 1})
    # Greedy sanity generations every `every` steps in training, to samples.jsonl and wandb.
    sample_prompts: list[str] = field(default_factory=lambda: ["import os\n", "def ", "class "])
    sample_max_new_tokens: int = field(default=32, metadata={"min": 1})


@dataclass
class GenerateConfig:
    # As eval.model_path: an export, a checkpoint step_<N> or a checkpoints directory.
    model_path: str = "${checkpoint.export_dir}"
    prompts: list[str] = field(default_factory=lambda: ["import os\n", "def ", "class "])
    # One prompt a line, or jsonl with a "prompt" field; used instead of `prompts` when set.
    prompts_file: Optional[str] = None
    # Samples written here as jsonl (prompt, text, tokens, tokens/s); null: printed only.
    output: Optional[str] = None
    batch_size: int = field(default=8, metadata={"min": 1})
    max_new_tokens: int = field(default=64, metadata={"min": 1})
    # 0: greedy; otherwise sampled with top_k (0: off), top_p (1.0: off).
    temperature: float = field(default=0.8, metadata={"min": 0})
    top_k: int = field(default=50, metadata={"min": 0})
    top_p: float = field(default=0.95, metadata={"above": 0, "max": 1})
    # 1.0: off; >1 discourages tokens already in the sequence (CTRL's penalty).
    repetition_penalty: float = field(default=1.0, metadata={"above": 0})
    # Generation stops at EOS or at any of these strings (which are kept in the text).
    stop: list[str] = field(default_factory=list)
    seed: int = 0
    precision: Precision = Precision.auto
    # A smaller model with the same tokenizer for speculative (assisted) decoding; one prompt at a time.
    draft_model_path: Optional[str] = None


@dataclass
class ExportConfig:
    # A DeepSpeed checkpoint step_<N> directory, or a checkpoints directory (its `latest`).
    # `zeroforge export checkpoint=<dir>` sets it.
    checkpoint: Optional[str] = None
    # null: <run dir>/export_<step dir name>, beside the run's own export.
    output: Optional[str] = None
    # auto: the precision the run trained in (the weights the model computed with).
    precision: Precision = Precision.auto
    # Largest safetensors file of an export (and of the training run's own), in GiB; a bigger
    # single tensor gets a file of its own. Files are written one tensor at a time, so this does
    # not change the memory an export needs.
    shard_size_gb: float = field(default=5.0, metadata={"above": 0})


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
    nodes: int = field(default=1, metadata={"min": 1})
    # Training processes per node (one per GPU); each node runs one torchrun that starts them.
    nproc_per_node: int = field(default=1, metadata={"min": 1})
    # Dense bf16 peak of one accelerator, for MFU; null: detected from the GPU, or unknown.
    peak_tflops: Optional[float] = field(default=None, metadata={"above": 0})
    # Memory of one accelerator in GiB (what vendors call GB); null: unknown, the planner never refuses.
    gpu_memory_gb: Optional[float] = field(default=None, metadata={"above": 0})
    # Host (CPU) memory of one node in GiB; null: unknown, the planner reports host memory but never
    # refuses for it.
    host_memory_gb: Optional[float] = field(default=None, metadata={"above": 0})
    # The GPUs' compute capability (9.0 H100, 10.0 B200): what a launch checks train.precision=fp8
    # against where the job's GPUs are not this machine's; null: unknown, the ranks check.
    gpu_capability: Optional[float] = field(default=None, metadata={"min": 0})
    # GPUs Slurm allocates per node (--gpus-per-node); 0 on CPU-only nodes.
    gpus_per_node: int = field(default=0, metadata={"min": 0})
    # Slurm placement; null: the site's default. time is Slurm's --time (e.g. 2-00:00:00), in one
    # of the formats sbatch accepts, checked before anything is submitted.
    account: Optional[str] = None
    partition: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclude: Optional[str] = None
    time: str = field(default="24:00:00", metadata={"slurm_time": True})
    # Slurm warns the job this many seconds before its time limit; the run saves and requeues.
    warning_s: int = field(default=300, metadata={"min": 1})
    # A node that cannot join the rendezvous within this many seconds fails the job (not a hang).
    rendezvous_timeout_s: int = field(default=300, metadata={"min": 1})
    # Seconds a rank may go without completing a training step (with that step's validation, save
    # or export) before it counts as hung: every live rank then writes what it was doing to
    # run.dir/hangs/ and the job ends with exit code 76 (trainer/watchdog.py). null: the launcher
    # sizes it from the plan (10 steps or 3 saves, at least 10 min); a rank started by hand: 10 min.
    hang_timeout_s: Optional[int] = field(default=None, metadata={"min": 1})
    # The same before the first step completes: the rendezvous, data, model build and the first
    # step's compilation.
    startup_timeout_s: int = field(default=1800, metadata={"min": 1})
    # On Slurm, a job that hung (or whose node never reached the rendezvous) is requeued without the
    # stuck nodes this many times (slurm/pretrain.sh); 0: it fails instead.
    max_hang_requeues: int = field(default=2, metadata={"min": 0})
    # GiB/s one process reads or writes checkpoint files at on the checkpoint filesystem: the time
    # the plan gives the universal conversion (and its default time limit) comes from it.
    storage_gb_s: float = field(default=0.5, metadata={"above": 0})
    # Exported on every node before torchrun starts (NCCL and InfiniBand settings).
    env: dict[str, str] = field(default_factory=dict)
    # Passed verbatim to sbatch, for flags the fields above don't cover (e.g. --mem=0, --exclusive).
    sbatch_args: list[str] = field(default_factory=list)


@dataclass
class LauncherConfig:
    # Run held-out evaluation and sample generation on the export after training.
    harness: bool = True
    # After every check, print what the launch would run (locally the torchrun command, on Slurm
    # the sbatch command and the script) and start nothing: no data prepared, no run directory.
    dry_run: bool = False
    # The pre-flight memory plan (launcher/plan.py): launch even when it says the job does not fit.
    force: bool = False
    # Model FLOPs utilisation assumed for the planned step time and time to the token budget.
    assumed_mfu: float = field(default=0.4, metadata={"above": 0, "max": 1})
    # The inference line of the plan: weights plus KV cache for this batch at this context
    # (null: model.max_position_embeddings).
    inference_batch_size: int = field(default=1, metadata={"min": 1})
    inference_context: Optional[int] = field(default=None, metadata={"min": 1})


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    seed: int = 1234
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
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


# What whole-run functions accept: the composed config, or its dataclasses (as_config).
AnyConfig = Union[Config, DictConfig]


def as_config(cfg: DictConfig) -> Config:
    """The composed config as the dataclasses above (enums, lists and dicts as Python's own), once
    it is validated: components read plain attributes, with the types their hints say."""
    return cast(Config, OmegaConf.to_object(cfg))


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose conf/ like the entry points do; for tests and tools that call train(cfg) directly."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))
