"""validate(cfg, world_size): derive what follows from the config and refuse what cannot run."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import DictConfig

from launcher.config import ConfigError

ZERO_STAGES = (0, 1, 2, 3)
WANDB_MODES = ("auto", "online", "offline", "disabled")


@dataclass(frozen=True)
class Plan:
    """The numbers derived from the config and the world size; nothing here is set by hand."""

    world_size: int
    dp_size: int
    grad_accum: int
    precision: str
    device: str

    def tokens_per_step(self, cfg: DictConfig) -> int:
        return cfg.train.global_batch_size * cfg.data.seq_len


def _check(ok: bool, message: str, problems: list[str]) -> None:
    if not ok:
        problems.append(message)


def validate(cfg: DictConfig, world_size: int, cuda: Optional[bool] = None) -> Plan:
    """Every problem found is reported at once, each naming the keys and numbers involved."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
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
    _check(cfg.eval.every >= 0, f"eval.every must be 0 (off) or more, found {cfg.eval.every}", problems)
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
    if problems:
        raise ConfigError("; ".join(problems) + ".")

    precision = t.precision.value if hasattr(t.precision, "value") else str(t.precision)
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    return Plan(
        world_size=world_size,
        dp_size=dp,
        grad_accum=glob // (micro * dp),
        precision=precision,
        device="cuda" if cuda else "cpu",
    )
