"""The model: a plain transformers causal LM built from config. Wrapping happens in engine.py."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from zeroforge.trainer.config import ConfigError, ModelConfig

log = logging.getLogger("zeroforge")


def resolve_vocab_size(cfg: ModelConfig, tokenizer_vocab: int) -> int:
    if cfg.vocab_size is None:
        # A multiple of 64 keeps the embedding and output matmuls on fast tensor-core shapes.
        return -(-tokenizer_vocab // 64) * 64
    if cfg.vocab_size < tokenizer_vocab:
        raise ConfigError(
            f"the tokenizer has {tokenizer_vocab} tokens but model.vocab_size={cfg.vocab_size} "
            f"({cfg.name}); set model.vocab_size to at least {tokenizer_vocab}, or null to size it "
            "from the tokenizer."
        )
    return cfg.vocab_size


def hf_config(cfg: ModelConfig, vocab_size: int, eos_id: int | None = None) -> PretrainedConfig:
    return AutoConfig.for_model(
        cfg.model_type,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        vocab_size=vocab_size,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        **cfg.extra,
    )


# Our model fields and the transformers config attribute each one sets (hf_config).
HF_NAMES = {
    "model_type": "model_type",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "vocab_size": "vocab_size",
    "tie_word_embeddings": "tie_word_embeddings",
}
# The fields that decide the weights' shapes: model.init_from's config must agree on them.
WEIGHT_SHAPE = {ours: theirs for ours, theirs in HF_NAMES.items() if ours != "max_position_embeddings"}
# The same model, as a checkpoint continues it: the same weights, computed the same way.
SAME_MODEL = (*WEIGHT_SHAPE, "max_position_embeddings", "extra")


def model_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """How the model section a checkpoint recorded differs from this run's (SAME_MODEL)."""
    return [f"model.{key}: checkpoint {saved[key]!r}, now {now[key]!r}" for key in SAME_MODEL if saved[key] != now[key]]


def check_init_from(cfg: ModelConfig, vocab_size: int, data_tokenizer_hash: str) -> None:
    """Before any weights load: model.init_from has the configured shape and the data's tokenizer."""
    from zeroforge.data.tokenizer import load_tokenizer, tokenizer_hash

    if cfg.init_from is None:
        return
    try:
        theirs = AutoConfig.from_pretrained(cfg.init_from)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.init_from={cfg.init_from}: no causal LM config could be read there ({err}).") from None
    ours = hf_config(cfg, vocab_size)
    problems = [
        f"{key}: {cfg.init_from} has {getattr(theirs, key, None)!r}, model={cfg.name} has {getattr(ours, key)!r}"
        for key in WEIGHT_SHAPE.values()
        if getattr(theirs, key, None) != getattr(ours, key)
    ]
    if tokenizer_hash(load_tokenizer(cfg.init_from)) != data_tokenizer_hash:
        problems.append(f"tokenizer: the data was not tokenized with {cfg.init_from}'s tokenizer (set data.tokenizer={cfg.init_from})")
    if problems:
        raise ConfigError(f"model.init_from={cfg.init_from} does not fit this run: " + "; ".join(problems) + ".")


def build_model(cfg: ModelConfig, vocab_size: int, eos_id: int | None = None) -> PreTrainedModel:
    """Randomly initialised in fp32 (the seed must be set before this call), or model.init_from's weights."""
    if cfg.init_from:
        log.info("weights from %s (model.init_from); the optimizer and the data position start fresh", cfg.init_from)
        return AutoModelForCausalLM.from_pretrained(cfg.init_from, dtype=torch.float32, attn_implementation=cfg.attn_implementation)
    config = hf_config(cfg, vocab_size, eos_id)
    return AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation)


def flops_per_token(config: PretrainedConfig, num_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters) + the attention term 12 x L x d x T.

    The input embedding is a lookup, not a matmul, but the output projection is one whether or
    not it is tied to the embedding.
    """
    embed = config.vocab_size * config.hidden_size
    matmul_params = num_params if config.tie_word_embeddings else num_params - embed
    return 6.0 * matmul_params + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len
