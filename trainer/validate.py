"""validate(cfg, world_size): derive what follows from the config and refuse what cannot run.

Every problem is found before any process group, data or model exists and reported at once,
each naming the key, what was expected and what was found: the schema's per-field rules (field
metadata in trainer/config.py and data/config.py), the rules between fields below, the model
shape (its transformers config is built, weightless) and DeepSpeed's own check of the
zero_optimization section generated from the config.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import re
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, cast

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from zeroforge.data.config import DataConfig
from zeroforge.data.errors import DataError
from zeroforge.data.partitions import check_partition_split
from zeroforge.trainer.config import (
    Config,
    ConfigError,
    DeepSpeedConfig,
    Loss,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    Schedule,
    Scheduler,
    TrainConfig,
)
from zeroforge.trainer.fp8 import fp8_problems, gpu_capability
from zeroforge.trainer.moe import experts_problems
from zeroforge.trainer.schedule import decay_steps
from zeroforge.trainer.topology import Topology, accelerator_is_cuda, job_is_on_gpus, job_world_size, resolve_precision

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger("zeroforge")

# The attention kernels Ulysses sequence parallelism runs (DeepSpeed refuses eager).
SEQUENCE_PARALLEL_ATTENTION = frozenset({"sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"})

# Degrees above 1 are refused until each parallelism lands (its issue).
_NOT_YET = {"tensor": "tensor parallelism (AutoTP)"}


# What sbatch --time accepts: its manual's formats ("a time limit of zero requests that no time
# limit be imposed"), and the words Slurm's parser takes for none, in any case.
SLURM_TIME_FORMATS = (
    "minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes or "
    "days-hours:minutes:seconds (e.g. 90, 2-00:00:00), or 0, UNLIMITED or INFINITE for no limit"
)
_SLURM_TIME = re.compile(r"(?:([0-9]+)-)?([0-9]+)((?::[0-9]+){0,2})")


def slurm_time_limit_s(value: str) -> Optional[int]:
    """The time limit a Slurm --time value sets, in seconds (Slurm rounds up to whole minutes);
    None for no limit; ValueError for a value sbatch would refuse."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    match = _SLURM_TIME.fullmatch(value)
    if match is None:
        raise ValueError(f"{value!r} is not a Slurm time limit; expected {SLURM_TIME_FORMATS}")
    days, first, rest = match.groups()
    clock = [int(first), *(int(part) for part in rest.split(":")[1:])]
    if days is not None:  # days-hours[:minutes[:seconds]]
        hours, minutes, seconds = clock + [0] * (3 - len(clock))
    elif len(clock) == 3:  # hours:minutes:seconds
        hours, minutes, seconds = clock
    else:  # minutes[:seconds]
        hours = 0
        minutes, seconds = clock + [0] * (2 - len(clock))
    limit = ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds
    return -(-limit // 60) * 60 or None


def _rule_problems(value: Any, rule: dict[str, Any]) -> Optional[str]:
    """What `value` breaks of `rule` ("expected ..."), or None; a null value is not checked."""
    if value is None:
        return None
    if "slurm_time" in rule:
        try:
            slurm_time_limit_s(str(value))
        except ValueError:
            return _describe(rule)
        return None
    if "each" in rule:
        broken = [v for v in value if _rule_problems(v, rule["each"])]
        return _describe(rule["each"]) if broken else None
    if "choices" in rule:
        choices = [str(c).upper() for c in rule["choices"]] if rule.get("ignore_case") else rule["choices"]
        found = str(value).upper() if rule.get("ignore_case") else value
        return None if found in choices else f"one of {list(rule['choices'])}"
    ok = all(
        (
            "min" not in rule or value >= rule["min"],
            "max" not in rule or value <= rule["max"],
            "above" not in rule or value > rule["above"],
            "below" not in rule or value < rule["below"],
        )
    )
    return None if ok else _describe(rule)


def _describe(rule: dict[str, Any]) -> str:
    if "slurm_time" in rule:
        return f"a Slurm time limit: {SLURM_TIME_FORMATS}"
    if "choices" in rule:
        return f"one of {list(rule['choices'])}"
    words = {"min": "at least", "above": "above", "max": "at most", "below": "below"}
    return " and ".join(f"{words[k]} {rule[k]}" for k in words if k in rule)


def field_problems(schema: type, node: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(key, why) of each field of `node` (a config section) that breaks its schema's rule."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        value, key, hint = node.get(f.name), f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from field_problems(cast(type, hint), value, key + ".")
        elif typing.get_origin(hint) is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            for i, item in enumerate(value or []):  # a list of sections (data.mixture)
                yield from field_problems(typing.get_args(hint)[0], item, f"{key}[{i}].")
        elif f.metadata:
            value = list(value) if isinstance(value, ListConfig) else value
            expected = _rule_problems(value, dict(f.metadata))
            if expected:
                yield key, f"{'every element of ' if 'each' in f.metadata else ''}{key} must be {expected}, found {value!r}"


def _check_model(m: ModelConfig, problems: list[str]) -> Optional[PretrainedConfig]:
    """Build the (weightless) transformers config now, so a bad model fails before any job starts;
    the config, where transformers could build it."""
    from zeroforge.trainer.model import HF_NAMES, hf_config, hf_names, model_fields

    vocab_size = m.vocab_size or 64  # null: the tokenizer's, which is not known yet
    try:
        config = hf_config(m, vocab_size)
    except Exception as err:  # whatever transformers' config refuses, and why, in one line
        reason = " ".join(str(err).split())
        reason = reason if len(reason) < 400 else reason[:400] + " ..."
        problems.append(
            f"model={m.name} (model.model_type={m.model_type!r}, model.hidden_size={m.hidden_size}, model.num_heads="
            f"{m.num_heads}, model.extra={dict(m.extra)}) is not a causal LM config transformers can build: {reason}"
        )
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        problems.append(
            f"model.model_type={m.model_type!r} has no causal LM model in transformers; expected a decoder such as llama, qwen2 or gpt2"
        )
        return None
    # Every field, as the model built from this config will have it: a field that does not reach
    # the config must not train (and be planned) as a model other than the one configured.
    found, names, config_name = model_fields(config), hf_names(m.model_type), type(config).__name__
    for ours in (key for key in HF_NAMES if key != "model_type"):  # the model type chose the config class
        wanted = vocab_size if ours == "vocab_size" else getattr(m, ours)
        if found[ours] == wanted:
            continue
        theirs, where = names[ours], f"model.{ours}={wanted} does not reach the {m.model_type} config"
        if found[ours] is None:
            problems.append(f"{where}: {config_name} has no {theirs}, so the model never reads it; use a model type whose config has it")
        elif ours == "num_kv_heads" and getattr(config, theirs, None) is None:
            problems.append(
                f"{where}: {config_name} has no {theirs}, and its model gives each of its {found[ours]} attention heads "
                f"keys and values of its own; set model.num_kv_heads={found[ours]}, or use a model type with grouped-query attention"
            )
        else:
            problems.append(f"{where}: its {theirs} is {found[ours]!r}; set that model type's own field through model.extra")
    return config


def _check_kernels(m: ModelConfig, train: TrainConfig, cuda: bool, problems: list[str]) -> None:
    """The loss, Liger and attention kernels asked for exist here, before any process starts.

    An explicit request that cannot be honoured is an error, not a silent fallback: a run (or a
    benchmark) that asked for a kernel must not measure another one. The defaults never ask.
    """
    from zeroforge.trainer.loss import LINEAR_HEAD_MODEL_TYPES

    loss = Loss(train.loss).value
    if loss in ("chunked", "liger") and m.model_type not in LINEAR_HEAD_MODEL_TYPES:
        problems.append(
            f"train.loss={loss} computes the logits as the output layer of the hidden states, which "
            f"model.model_type={m.model_type!r} is not known to do exactly (known: {sorted(LINEAR_HEAD_MODEL_TYPES)}); "
            "use train.loss=plain (or auto)"
        )
    wants_liger = [key for key, on in (("train.loss=liger", loss == "liger"), ("model.liger_kernels=true", m.liger_kernels)) if on]
    if wants_liger:
        if importlib.util.find_spec("liger_kernel") is None:
            problems.append(
                f"{' and '.join(wants_liger)} need Liger's kernels, which are not installed: pip install liger-kernel "
                "(Triton kernels, CUDA GPUs only); or train.loss=chunked and model.liger_kernels=false"
            )
        elif not cuda:
            problems.append(f"{' and '.join(wants_liger)}: Liger's kernels are Triton, for CUDA GPUs only, and this run is on the CPU")
        elif m.liger_kernels:
            from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

            _check(
                m.model_type in MODEL_TYPE_TO_APPLY_LIGER_FN,
                f"model.liger_kernels=true: Liger has no kernels for model.model_type={m.model_type!r} "
                f"(it has: {sorted(MODEL_TYPE_TO_APPLY_LIGER_FN)})",
                problems,
            )
    if m.attn_implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            problems.append(
                "model.attn_implementation=flash_attention_2 needs the flash-attn package, which is not installed: "
                "pip install flash-attn --no-build-isolation (CUDA GPUs only); or model.attn_implementation=sdpa, "
                "whose flash backend runs without it"
            )
        elif not cuda:
            problems.append("model.attn_implementation=flash_attention_2 runs on CUDA GPUs only, and this run is on the CPU; use sdpa")


def _check_schedule(optim: OptimConfig, steps: int, problems: list[str]) -> None:
    """The learning rate reaches optim.lr, and wsd's decay has its whole length, within train.steps.
    train.steps is the whole run's: a resumed run keeps the schedule of its absolute step."""
    warmup, decay = optim.warmup_steps, decay_steps(optim, steps)
    if warmup >= steps:
        problems.append(
            f"optim.warmup_steps={warmup} must be below train.steps={steps}: the learning rate rises to optim.lr over the "
            f"warmup steps, so this run would spend all its {steps} steps warming up, reaching {steps / warmup:.0%} of it, "
            f"and never decay; lower optim.warmup_steps (for example to {steps // 10}) or raise train.steps above {warmup}"
        )
    elif Schedule(optim.schedule) is Schedule.wsd and warmup + decay > steps:
        problems.append(
            f"optim.warmup_steps={warmup} and the wsd decay's {decay} steps (optim.decay_fraction={optim.decay_fraction} "
            f"of train.steps={steps}) must fit in train.steps={steps}: the decay would start at step {warmup} and last "
            f"{steps - warmup} steps instead of {decay}; lower optim.warmup_steps to at most {steps - decay} or "
            "optim.decay_fraction, or raise train.steps"
        )


def _check(ok: bool, message: str, problems: list[str]) -> None:
    if not ok:
        problems.append(message)


def check_fields(cfg: DictConfig) -> dict[str, str]:
    """What every command checks first: the config resolves (no value left ???, no interpolation
    that fails) and every field keeps its own rule. Returns the fields that do not, with why;
    raises when the config does not resolve."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"the config does not resolve: {' '.join(str(err).split())}.") from None
    return dict(field_problems(Config, cfg))


def _check_zero_section(ds: DeepSpeedConfig, cuda: bool, problems: list[str]) -> None:
    """DeepSpeed's own model of the zero_optimization section we generate, so that a mistyped
    deepspeed.zero_extra key fails here rather than in every rank's deepspeed.initialize."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    from zeroforge.trainer.deepspeed_config import zero_optimization

    try:
        DeepSpeedZeroConfig(**zero_optimization(ds, "cuda" if cuda else "cpu"))
    except ValidationError as err:
        for e in err.errors():
            key = ".".join(str(part) for part in e["loc"])
            problems.append(
                f"deepspeed.zero_extra.{key}: {e['msg'].lower()} (found {e['input']!r}; see DeepSpeed's zero_optimization options)"
            )


def _check_parallel(p: ParallelConfig, world_size: int, problems: list[str]) -> None:
    degrees = {"sequence": p.sequence, "tensor": p.tensor, "expert": p.expert}
    for name, why in _NOT_YET.items():
        _check(degrees[name] == 1, f"parallel.{name}={degrees[name]}: {why} is not available yet; expected 1", problems)
    product = degrees["sequence"] * degrees["tensor"] * degrees["expert"]
    _check(
        world_size % product == 0,
        f"parallel.sequence ({degrees['sequence']}) x parallel.tensor ({degrees['tensor']}) x parallel.expert "
        f"({degrees['expert']}) = {product} must divide the world size {world_size}",
        problems,
    )


def sequence_parallel_problems(sp: int, m: ModelConfig, data: DataConfig, ds: DeepSpeedConfig) -> list[str]:
    """Ulysses splits every sequence into `sp` slices and, around attention, the heads into `sp`
    groups (key/value heads may be repeated up to `sp`); it runs the model's own attention kernel
    without the 4D mask eager attention needs. What stops `sp` from splitting this model's
    sequences (none at 1); the planner asks it of the degrees it may offer as a fix."""
    problems: list[str] = []
    if sp == 1:
        return problems
    _check(data.seq_len % sp == 0, f"data.seq_len={data.seq_len} must be divisible by parallel.sequence={sp}", problems)
    _check(m.num_heads % sp == 0, f"model.num_heads={m.num_heads} must be divisible by parallel.sequence={sp}", problems)
    _check(
        m.num_kv_heads % sp == 0 or sp % m.num_kv_heads == 0,
        f"model.num_kv_heads={m.num_kv_heads} and parallel.sequence={sp}: one must divide the other",
        problems,
    )
    _check(
        m.attn_implementation in SEQUENCE_PARALLEL_ATTENTION,
        f"parallel.sequence={sp} needs model.attn_implementation in {sorted(SEQUENCE_PARALLEL_ATTENTION)}, "
        f"found {m.attn_implementation!r} (Ulysses drops the 4D mask eager attention needs)",
        problems,
    )
    _check(
        not (data.reset_position_ids and m.attn_implementation == "flex_attention"),
        f"parallel.sequence={sp} with model.attn_implementation=flex_attention attends across packed documents "
        "(Ulysses rebuilds a causal-only block mask); with data.reset_position_ids=true use sdpa or flash_attention_2",
        problems,
    )
    _check(
        ds.stage != 3 or ds.zero_extra.get("reduce_scatter", True),
        f"parallel.sequence={sp} under ZeRO-3 needs DeepSpeed's reduce-scatter of gradients, found "
        "deepspeed.zero_extra.reduce_scatter=false (its other path scales large parameters' gradients "
        "differently; trainer/sequence_parallel.py)",
        problems,
    )
    return problems


def validate(cfg: DictConfig, world_size: int, cuda: Optional[bool] = None) -> Topology:
    """Every problem found is reported at once, each naming the keys and numbers involved; the
    topology of a config that can run. `cuda`: whether the job's machines have GPUs (None: this
    machine's accelerator, as a rank asks)."""
    broken = check_fields(cfg)  # key -> why
    # A rank, or a local launch, runs on this machine's accelerator; a cluster's nodes are described by its config.
    here = cuda is None or cfg.cluster.scheduler == Scheduler.local
    if cuda is None:
        cuda = accelerator_is_cuda()
    problems = list(broken.values())
    _check(world_size >= 1, f"world size must be at least 1, found {world_size}", problems)

    def fine(*keys: str) -> bool:
        """The rules between fields are checked only where each field keeps its own rule."""
        return not broken.keys() & set(keys)

    t, m, ds = cfg.train, cfg.model, cfg.deepspeed
    world_size = max(world_size, 1)
    parallel_fine = fine("parallel.sequence", "parallel.tensor", "parallel.expert")
    if parallel_fine:
        _check_parallel(cfg.parallel, world_size, problems)
    p = cfg.parallel if parallel_fine else ParallelConfig()  # broken degrees are reported above
    micro, glob = t.micro_batch_size, t.global_batch_size
    topology = Topology(
        world_size=world_size,
        sequence=p.sequence,
        tensor=p.tensor,
        expert=p.expert,
        micro_batch_size=micro,
        global_batch_size=glob,
        seq_len=cfg.data.seq_len,
        device="cuda" if cuda else "cpu",
        precision=resolve_precision(t.precision, cuda),
    )
    dp = max(topology.dp_size, 1)  # degrees that do not divide the world size are reported above
    if fine("train.micro_batch_size", "train.global_batch_size"):
        _check(
            glob % (micro * dp) == 0,
            f"train.global_batch_size={glob} must be a positive multiple of "
            f"train.micro_batch_size ({micro}) x data-parallel size ({dp}) = {micro * dp}; "
            f"for example train.global_batch_size={micro * dp * max(1, glob // (micro * dp))}",
            problems,
        )
    _check(
        not ds.offload_optimizer or ds.stage >= 1,
        f"deepspeed.offload_optimizer needs ZeRO stage 1, 2 or 3, found stage {ds.stage}",
        problems,
    )
    _check(
        not ds.offload_params or ds.stage == 3,
        f"deepspeed.offload_params needs ZeRO stage 3, found stage {ds.stage}",
        problems,
    )
    _check(
        t.spike_zscore is None or not ds.offload_optimizer,
        f"train.spike_zscore={t.spike_zscore} with deepspeed={ds.name}: ZeRO-Offload's CPU Adam cannot skip a step; "
        "turn the guard off (train.spike_zscore=null) or the offload",
        problems,
    )
    _check(
        len(cfg.optim.betas) == 2,
        f"optim.betas must be two numbers (Adam's beta1, beta2), found {list(cfg.optim.betas)}",
        problems,
    )
    if fine("optim.warmup_steps", "optim.decay_fraction", "optim.schedule", "train.steps"):
        _check_schedule(cfg.optim, t.steps, problems)
    _check(
        cfg.data.seq_len <= m.max_position_embeddings,
        f"data.seq_len={cfg.data.seq_len} must be between 1 and the model's maximum "
        f"model.max_position_embeddings={m.max_position_embeddings} ({m.name})",
        problems,
    )
    if fine("model.num_heads"):
        _check(
            m.hidden_size % m.num_heads == 0,
            f"model.hidden_size={m.hidden_size} must be divisible by model.num_heads={m.num_heads}",
            problems,
        )
    if fine("model.num_heads", "model.num_kv_heads", "data.seq_len", "model.attn_implementation", "data.reset_position_ids"):
        problems += sequence_parallel_problems(topology.sequence, m, cfg.data, ds)
    if fine("model.num_kv_heads"):
        _check(
            m.num_heads % m.num_kv_heads == 0,
            f"model.num_heads={m.num_heads} must be divisible by model.num_kv_heads={m.num_kv_heads}",
            problems,
        )
    resume = cfg.checkpoint.resume
    _check(
        resume in ("auto", "never") or Path(resume).is_dir(),
        f"checkpoint.resume must be auto, never or a checkpoint directory, found {resume!r} (no such directory)",
        problems,
    )
    if cfg.data.mode == "stream" and fine("data.stream_partitions", "data.num_workers"):
        try:
            check_partition_split(cfg.data.stream_partitions, dp, cfg.data.num_workers)
        except DataError as err:
            problems.append(str(err).rstrip("."))
    _check_zero_section(cfg.deepspeed, cuda, problems)
    model_keys = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "max_position_embeddings", "vocab_size")
    if fine(*(f"model.{key}" for key in model_keys)):
        config = _check_model(cfg.model, problems)
        if config is not None:
            problems += experts_problems(topology, config, m.name, ds.stage)
    _check_kernels(cfg.model, cfg.train, cuda, problems)
    if topology.precision == "fp8" and fine("train.fp8_recipe"):
        problems += fp8_problems(t.fp8_recipe, cuda, gpu_capability() if here else cfg.cluster.gpu_capability)
    if problems:
        raise ConfigError("; ".join(problems) + ".")
    log.debug("config validated: %s", topology)
    return topology


def job_topology(cfg: DictConfig) -> Topology:
    """validate() for a launch: the whole job (every node's ranks), on the machines the cluster
    config describes rather than the one launching it."""
    return validate(cfg, job_world_size(cfg.cluster), cuda=job_is_on_gpus(cfg.cluster))
