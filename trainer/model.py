"""The model: a plain transformers causal LM built from config. Wrapping happens in engine.py."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

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
    """The model type's transformers config with our fields under its names (hf_names). A field
    its config class does not take is left out, rather than kept as an attribute its model never
    reads; validate() refuses it where it differs from what the model has (model_fields)."""
    names = hf_names(cfg.model_type)
    config_class = CONFIG_MAPPING[cfg.model_type] if cfg.model_type in CONFIG_MAPPING else None
    ours = {key: getattr(cfg, key) for key in HF_NAMES if key != "model_type"}
    ours["vocab_size"] = vocab_size
    taken = {names[key]: value for key, value in ours.items() if config_class is None or _takes(config_class, names[key])}
    return AutoConfig.for_model(
        cfg.model_type,
        **taken,
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
# transformers' other names for the MLP width, in configs without an intermediate_size: n_inner
# (GPT-2, GPT-J, CodeGen, BigCode), ffn_dim (OPT, XGLM), ffn_hidden_size (Falcon).
MLP_WIDTH_NAMES = ("n_inner", "ffn_dim", "ffn_hidden_size")
# The fields that decide the weights' shapes: model.init_from's config must agree on them.
WEIGHT_SHAPE = tuple(key for key in HF_NAMES if key != "max_position_embeddings")
# The same model, as a checkpoint continues it: the same weights, computed the same way.
SAME_MODEL = (*WEIGHT_SHAPE, "max_position_embeddings", "extra")


def _takes(config_class: type, name: str) -> bool:
    """Whether a transformers config class has `name` as its own field, property or attribute_map
    entry; any other keyword argument it keeps as an attribute that its model never reads."""
    fields = getattr(config_class, "__dataclass_fields__", {})
    return name in getattr(config_class, "attribute_map", {}) or name in fields or hasattr(config_class, name)


def hf_names(model_type: str) -> dict[str, str]:
    """HF_NAMES for `model_type`, whose config may call the MLP width by another name
    (MLP_WIDTH_NAMES). transformers itself resolves the config's attribute_map (gpt2: hidden_size is
    n_embd), both when the config is built and when it is read."""
    if model_type not in CONFIG_MAPPING or _takes(CONFIG_MAPPING[model_type], "intermediate_size"):
        return HF_NAMES
    config_class = CONFIG_MAPPING[model_type]
    mlp = next((name for name in MLP_WIDTH_NAMES if _takes(config_class, name)), "intermediate_size")
    return {**HF_NAMES, "intermediate_size": mlp}


def model_fields(config: PretrainedConfig) -> dict[str, Any]:
    """What the model built from `config` has for each of our model fields (HF_NAMES), read under
    its config's own names: None where that config has no such field, so the model never reads ours;
    a config without a key/value head count has, as its model, one per attention head."""
    found = {ours: getattr(config, theirs, None) for ours, theirs in hf_names(config.model_type).items()}
    if found["num_kv_heads"] is None:
        found["num_kv_heads"] = found["num_heads"]
    return found


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
    ours, names = model_fields(hf_config(cfg, vocab_size)), hf_names(cfg.model_type)
    saved = model_fields(theirs)
    problems = [
        f"{names[key]}: {cfg.init_from} has {saved[key]!r}, model={cfg.name} has {ours[key]!r}"
        for key in WEIGHT_SHAPE
        if saved[key] != ours[key]
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
    """Training FLOPs per token: 6 x (matmul parameters) + the attention term 12 x L x d x T;
    num_params: those a token uses (a mixture of experts' active ones, trainer/moe.py).

    The input embedding is a lookup, not a matmul, but the output projection is one whether or
    not it is tied to the embedding.
    """
    embed = config.vocab_size * config.hidden_size
    matmul_params = num_params if config.tie_word_embeddings else num_params - embed
    return 6.0 * matmul_params + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len
