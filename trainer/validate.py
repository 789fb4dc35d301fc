"""validate(cfg, world_size): derive what follows from the config and refuse what cannot run."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Optional

from omegaconf import DictConfig

from zeroforge.trainer.config import ConfigError

ZERO_STAGES = (0, 1, 2, 3)
WANDB_MODES = ("auto", "online", "offline", "disabled")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class Plan:
    """The numbers derived from the config and the world size; nothing here is set by hand."""

    dp_size: int
    grad_accum: int
    tokens_per_step: int
    precision: str
    device: str


def accelerator_is_cuda() -> bool:
    """DeepSpeed's accelerator decides, so DS_ACCELERATOR=cpu means the CPU even beside a GPU."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cuda"


def _check_model(cfg: DictConfig, problems: list[str]) -> None:
    """Build the (weightless) transformers config now, so a bad model fails before any job starts."""
    from zeroforge.trainer.model import hf_config

    m = cfg.model
    try:
        config = hf_config(m, vocab_size=64)
    except (ValueError, KeyError, TypeError) as err:
        problems.append(f"model.model_type={m.model_type!r} with model.extra={dict(m.extra)} is not a causal LM config transformers can build ({err})")
        return
    for ours, theirs in [
        ("hidden_size", "hidden_size"),
        ("num_layers", "num_hidden_layers"),
        ("num_heads", "num_attention_heads"),
        ("max_position_embeddings", "max_position_embeddings"),
    ]:
        found = getattr(config, theirs, None)
        if found != m[ours]:
            problems.append(
                f"model.{ours}={m[ours]} did not reach the {m.model_type} config (its {theirs} is {found}); "
                "set that model type's own field through model.extra"
            )


def _check_kernels(cfg: DictConfig, cuda: bool, problems: list[str]) -> None:
    """The loss, Liger and attention kernels asked for exist here, before any process starts.

    An explicit request that cannot be honoured is an error, not a silent fallback: a run (or a
    benchmark) that asked for a kernel must not measure another one. The defaults never ask.
    """
    from zeroforge.trainer.loss import LINEAR_HEAD_MODEL_TYPES

    m, loss = cfg.model, getattr(cfg.train.loss, "value", cfg.train.loss)
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


def _check(ok: bool, message: str, problems: list[str]) -> None:
    if not ok:
        problems.append(message)


def validate(cfg: DictConfig, world_size: int, cuda: Optional[bool] = None) -> Plan:
    """Every problem found is reported at once, each naming the keys and numbers involved."""
    if cuda is None:
        cuda = accelerator_is_cuda()
    problems: list[str] = []
    t, m, ds = cfg.train, cfg.model, cfg.deepspeed
    dp = world_size
    micro, glob = t.micro_batch_size, t.global_batch_size

    _check(world_size >= 1, f"world size must be at least 1, found {world_size}", problems)
    _check(t.steps >= 1, f"train.steps must be at least 1, found {t.steps}", problems)
    _check(micro >= 1, f"train.micro_batch_size must be at least 1, found {micro}", problems)
    if micro >= 1 and dp >= 1:
        _check(
            glob >= 1 and glob % (micro * dp) == 0,
            f"train.global_batch_size={glob} must be a positive multiple of "
            f"train.micro_batch_size ({micro}) x data-parallel size ({dp}) = {micro * dp}; "
            f"for example train.global_batch_size={micro * dp * max(1, glob // (micro * dp))}",
            problems,
        )
    _check(
        ds.stage in ZERO_STAGES,
        f"deepspeed.stage={ds.stage} is not a ZeRO stage; expected one of {list(ZERO_STAGES)}",
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
    t = cfg.train
    _check(t.max_consecutive_skips >= 1, f"train.max_consecutive_skips must be at least 1, found {t.max_consecutive_skips}", problems)
    _check(
        t.spike_zscore is None or (t.spike_zscore > 0 and t.spike_window >= 2),
        f"the loss-spike guard needs train.spike_zscore > 0 and train.spike_window >= 2, found {t.spike_zscore} and {t.spike_window}",
        problems,
    )
    _check(
        t.spike_zscore is None or not ds.offload_optimizer,
        f"train.spike_zscore={t.spike_zscore} with deepspeed={ds.name}: ZeRO-Offload's CPU Adam cannot skip a step; "
        "turn the guard off (train.spike_zscore=null) or the offload",
        problems,
    )
    _check(
        cfg.data.seq_len >= 1 and cfg.data.seq_len <= m.max_position_embeddings,
        f"data.seq_len={cfg.data.seq_len} must be between 1 and the model's maximum "
        f"model.max_position_embeddings={m.max_position_embeddings} ({m.name})",
        problems,
    )
    _check(
        m.num_heads >= 1 and m.hidden_size % m.num_heads == 0,
        f"model.hidden_size={m.hidden_size} must be divisible by model.num_heads={m.num_heads}",
        problems,
    )
    _check(
        m.num_kv_heads >= 1 and m.num_heads % m.num_kv_heads == 0,
        f"model.num_heads={m.num_heads} must be divisible by model.num_kv_heads={m.num_kv_heads}",
        problems,
    )
    _check(cfg.logging.every >= 1, f"logging.every must be at least 1, found {cfg.logging.every}", problems)
    _check(cfg.checkpoint.every >= 0, f"checkpoint.every must be 0 (end only) or more, found {cfg.checkpoint.every}", problems)
    _check(
        cfg.checkpoint.keep_last >= 1,
        f"checkpoint.keep_last must be at least 1 (the newest checkpoint is always kept), found {cfg.checkpoint.keep_last}",
        problems,
    )
    _check(cfg.eval.every >= 0, f"eval.every must be 0 (off) or more, found {cfg.eval.every}", problems)
    _check(
        str(cfg.logging.level).upper() in LOG_LEVELS,
        f"logging.level={cfg.logging.level!r} must be one of {list(LOG_LEVELS)}",
        problems,
    )
    _check(
        cfg.logging.wandb.mode in WANDB_MODES,
        f"logging.wandb.mode={cfg.logging.wandb.mode!r} must be one of {list(WANDB_MODES)}",
        problems,
    )
    _check(
        0.0 < cfg.data.validation_fraction < 1.0,
        f"data.validation_fraction={cfg.data.validation_fraction} must be between 0 and 1 (exclusive)",
        problems,
    )
    _check(
        t.loss_chunk_tokens >= 1,
        f"train.loss_chunk_tokens must be at least 1, found {t.loss_chunk_tokens}",
        problems,
    )
    _check_model(cfg, problems)
    _check_kernels(cfg, cuda, problems)
    if problems:
        raise ConfigError("; ".join(problems) + ".")

    precision = t.precision.value if hasattr(t.precision, "value") else str(t.precision)
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    return Plan(
        dp_size=dp,
        grad_accum=glob // (micro * dp),
        tokens_per_step=glob * cfg.data.seq_len,
        precision=precision,
        device="cuda" if cuda else "cpu",
    )
