"""The model: a plain transformers causal LM built from config. Wrapping happens in engine.py."""
from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from launcher.config import ConfigError
from trainer.config import ModelConfig


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


def build_model(cfg: ModelConfig, vocab_size: int, eos_id: int | None = None) -> PreTrainedModel:
    """Randomly initialised in fp32; the seed must be set before this call."""
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
