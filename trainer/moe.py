"""Mixture-of-experts models: which models route tokens to experts, what parallel.expert needs
of them, ZeRO-3's leaf blocks and DeepSpeed's AutoEP (the router's loss and the experts' load are
in trainer/routing.py).

The model is built as the plain transformers MoE. Where AutoEP has a preset for its type,
DeepSpeed's engine replaces each MoE block by AutoEP's (`expert_parallel` in the generated DeepSpeed
config), whose ranks each hold experts / parallel.expert of every layer and exchange tokens with an
all-to-all. That happens at parallel.expert=1 too, so that a checkpoint's layout is the same at
every degree and a resume on another one goes through DeepSpeed's universal checkpoint; the export
writes the plain layout back (trainer/autoep_export.py). Other MoEs train as transformers builds
them, every expert on every rank.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any, Iterable

from zeroforge.trainer.topology import Topology

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

# transformers' names for a MoE config's routed-expert count (some configs alias num_local_experts
# to theirs, Qwen2-MoE and DeepSeek-V2 do not).
EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")
# The child every transformers MoE block keeps its routed experts in (shared experts are apart).
EXPERT_MODULE = "experts"


def num_experts(config: PretrainedConfig) -> int:
    """Routed experts per MoE layer; 0 for a dense model."""
    return int(next((n for n in (getattr(config, name, None) for name in EXPERT_COUNTS) if n), 0))


def experts_per_token(config: PretrainedConfig) -> int:
    return int(getattr(config, "num_experts_per_tok", None) or 0)


@functools.cache
def autoep_model_types() -> dict[str, str]:
    """The model types DeepSpeed's AutoEP can shard, and the preset it shards each with."""
    registry = importlib.import_module("deepspeed.module_inject.auto_ep_presets.registry")
    return {model_type: name for name, preset in registry.PRESET_MODELS.items() for model_type in preset.hf_model_types}


def experts_problems(topology: Topology, config: PretrainedConfig, model_name: str, zero_stage: int) -> list[str]:
    """What stops this run's parallel degrees from training this model's experts: parallel.expert
    must shard a MoE that AutoEP serves into equal parts, under ZeRO (at ZeRO-0 zeroforge takes the
    gradient norm itself, and would see only this rank's experts); a MoE's load-balancing loss is of
    whole sequences, which Ulysses' slices are not, and needs the router's logits."""
    experts, expert = num_experts(config), topology.expert
    if experts and topology.sequence > 1:
        return [
            f"parallel.sequence={topology.sequence} with a mixture of experts (model={model_name}): each rank would balance "
            "the routing of its slice of the sequence only; expected parallel.sequence=1"
        ]
    coef = getattr(config, "router_aux_loss_coef", None) or 0.0
    if coef and autoep_serves(config) and not autoep_hands_out_router_logits(config.model_type):
        return [
            f"model={model_name}: DeepSpeed's AutoEP layer for {config.model_type} does not hand out the router logits its "
            f"load-balancing loss needs (model.extra.router_aux_loss_coef={coef}); set it to 0, or use a model type whose "
            f"router logits AutoEP records ({', '.join(sorted(t for t in autoep_model_types() if autoep_hands_out_router_logits(t)))})"
        ]
    if expert == 1:
        return []
    if zero_stage == 0:
        return [f"parallel.expert={expert} needs ZeRO 1-3, found deepspeed stage 0 (each rank holds other experts' gradients)"]
    if experts == 0:
        return [f"parallel.expert={expert} needs a mixture-of-experts model, but model={model_name} ({config.model_type}) is dense"]
    served = autoep_model_types()
    if config.model_type not in served:
        return [
            f"parallel.expert={expert}: DeepSpeed's AutoEP cannot shard model_type {config.model_type!r} (model={model_name}); "
            f"it shards {sorted(served)}; train this model with parallel.expert=1 (every rank holds every expert)"
        ]
    if experts % expert:
        divisors = [d for d in range(1, experts + 1) if experts % d == 0]
        return [
            f"model={model_name} has {experts} experts per layer, not divisible by parallel.expert={expert}; expected one of {divisors}"
        ]
    return []


def autoep_serves(config: PretrainedConfig) -> bool:
    """A mixture of experts whose blocks DeepSpeed's AutoEP replaces, at any parallel.expert."""
    return num_experts(config) > 0 and config.model_type in autoep_model_types()


@functools.cache  # asked at every training forward
def autoep_hands_out_router_logits(model_type: str) -> bool:
    """Whether AutoEP's layer for this type records the router's raw logits where transformers'
    model reads them (its adapter retargets transformers' recorder; others record none, or the
    routing scores after their softmax)."""
    from deepspeed.module_inject.auto_ep_presets.base import TransformersTopLevelRouterLogitsAdapter
    from deepspeed.module_inject.auto_ep_presets.registry import get_preset, get_preset_adapter

    preset = get_preset(autoep_model_types()[model_type])
    return isinstance(get_preset_adapter(preset.preset_adapter), TransformersTopLevelRouterLogitsAdapter)


def autoep_section(config: PretrainedConfig, expert: int) -> dict[str, Any]:
    """DeepSpeed's expert_parallel section: AutoEP with the preset of this model type."""
    return {"enabled": True, "autoep_size": expert, "preset_model": autoep_model_types()[config.model_type]}


def accept_string_keys_in_output_recorders() -> None:
    """Let DeepSpeed's AutoEP register its router as transformers' recorder of router logits.

    transformers 5 keeps each model class's recorded outputs in `_CAN_RECORD_REGISTRY`, a dict keyed
    by `str(model class)` whose get() and item assignment take a *model* and derive the key
    (transformers/utils/output_capturing.py). DeepSpeed 0.19.8's AutoEP (auto_ep_presets/base.py)
    was written against the plain dict it used to be: it reads `registry.get(key, default)` and
    restores `registry[key] = entry` with the string keys, and the first raises "TypeError:
    _CanRecordRegistry.get() takes 2 positional arguments but 3 were given". The registry here
    takes either: a string key as the key itself, a model as transformers does. Models behave as
    before; string keys are what the dict stores anyway.
    """
    from transformers.utils import output_capturing

    registry = output_capturing._CAN_RECORD_REGISTRY
    if isinstance(registry, _KeyOrModelRegistry):
        return
    registry.__class__ = type("_KeyOrModelRegistry", (_KeyOrModelRegistry, type(registry)), {})


class _KeyOrModelRegistry(dict):
    def get(self, key: Any, default: Any = None) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            return dict.get(self, key, default)
        return super().get(key)  # type: ignore[call-arg]

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(key, str):
            dict.__setitem__(self, key, value)
        else:
            super().__setitem__(key, value)


def mark_leaf_blocks(model: torch.nn.Module) -> list[str]:
    """Make every MoE block a ZeRO-3 leaf: DeepSpeed gathers all of a leaf's parameters when the
    block starts, instead of each expert's when that expert runs. Otherwise a rank whose tokens
    miss an expert never gathers it, its ranks' gathers fall out of step and training hangs
    (DeepSpeed PR #4966). A block is any module with a child named `experts`: the layout of every
    transformers MoE, so no per-model list. Returns the blocks' class names."""
    import torch
    from deepspeed.utils import set_z3_leaf_modules

    classes = sorted(
        {type(module) for module in model.modules() if isinstance(getattr(module, EXPERT_MODULE, None), torch.nn.Module)}, key=str
    )
    if classes:
        set_z3_leaf_modules(model, classes)
    return [cls.__name__ for cls in classes]


def active_params(named_numels: Iterable[tuple[str, int]], config: PretrainedConfig) -> int:
    """The parameters one token's forward uses: all but the routed experts, and of those the
    experts_per_token / num_experts it is routed to (a dense model: all of them). What its FLOPs,
    and so its MFU, count; its memory counts them all."""
    experts = num_experts(config)
    total = 0.0
    for name, numel in named_numels:
        total += numel * experts_per_token(config) / experts if experts and is_expert_param(name) else numel
    return round(total)


def is_expert_param(name: str) -> bool:
    """A routed expert's parameter, by its name in the model (shared experts are not routed)."""
    return f".{EXPERT_MODULE}." in f".{name}"
