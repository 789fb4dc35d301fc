"""A model's shape as the planner needs it, counted on the meta device without a weight."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zeroforge.data.config import DataConfig
from zeroforge.trainer.config import ConfigError, ModelConfig


@dataclass(frozen=True)
class ModelShape:
    """What the memory and time of a model depend on, counted without allocating a weight."""

    name: str
    params: int
    # Those one token's forward uses (a mixture of experts': its routed share of the experts).
    active_params: int
    # A mixture of experts: its routed experts' parameters, and experts per MoE layer (0: dense).
    expert_params: int
    experts: int
    # The largest single module's parameters: what ZeRO-3 gathers at once (as DeepSpeed counts it).
    largest_layer: int
    vocab_size: int
    hidden: int
    kv_hidden: int
    intermediate: int
    layers: int
    heads: int
    flops_per_token: float


def model_shape(m: ModelConfig, data: DataConfig) -> ModelShape:
    """Count parameters on the meta device: any AutoConfig causal LM, no memory for weights."""
    from transformers import AutoModelForCausalLM

    from zeroforge.trainer.model import flops_per_token, hf_config, model_fields
    from zeroforge.trainer.moe import active_params, is_expert_param, num_experts

    vocab = planned_vocab_size(m, data)
    config = hf_config(m, vocab)
    # The shape the model has, read from its config: validate() refused every field that did not reach it.
    has = model_fields(config)
    hidden, heads = int(has["hidden_size"]), int(has["num_heads"])
    head_dim = getattr(config, "head_dim", None) or hidden // heads  # some configs set it apart (gemma)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # a tied embedding is counted once
    named = [(name, p.numel()) for name, p in model.named_parameters()]
    active = active_params(named, config)
    largest = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in model.modules())
    return ModelShape(
        name=m.name,
        params=params,
        largest_layer=largest,
        vocab_size=vocab,
        hidden=hidden,
        kv_hidden=head_dim * int(has["num_kv_heads"]),
        intermediate=int(has["intermediate_size"]),
        layers=int(has["num_layers"]),
        heads=heads,
        active_params=active,
        expert_params=sum(numel for name, numel in named if is_expert_param(name)),
        experts=num_experts(config),
        flops_per_token=flops_per_token(config, active, data.seq_len),
    )


def planned_vocab_size(model: ModelConfig, data: DataConfig) -> int:
    """The vocabulary training will use, known before the data is prepared where possible."""
    from zeroforge.data.build import prepared_manifest
    from zeroforge.trainer.model import resolve_vocab_size

    if model.vocab_size is not None:
        return model.vocab_size
    manifest = prepared_manifest(data)
    if manifest is not None:
        return resolve_vocab_size(model, manifest["vocab_size"])
    if data.tokenizer == "embedded":
        return resolve_vocab_size(model, data.tokenizer_vocab_size)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(data.tokenizer)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"the plan needs the vocabulary size, but data.tokenizer={data.tokenizer!r} could not be loaded ({err}); set model.vocab_size"
        ) from err
    return resolve_vocab_size(model, len(tokenizer))
