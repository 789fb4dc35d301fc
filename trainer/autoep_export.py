"""AutoEP's MoE blocks written back in the plain transformers layout, for the HF export.

DeepSpeed's AutoEP (trainer/moe.py) replaces each MoE block with its own layer: a router
(`router.gate`), each rank's share of the experts as grouped tensors `experts.w1` (gate), `w3` (up)
and `w2` (down), [local experts, ...], and the block's shared experts under `shared_experts`. The
export undoes that (the inverse of deepspeed/moe/ep_repack.py): every rank's experts gathered in
rank order (AutoEP places them contiguously), gate and up fused back where the model type fuses them,
the router and shared experts under the block's own names; every name and shape is then checked
against the plain model built from the same config, so that transformers' own from_pretrained loads
the export as the model it is.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from deepspeed.moe.fused_expert_layout import classify_fused_gate_up_layout

from zeroforge.trainer.distributed import DistInfo
from zeroforge.trainer.hf_export import Entry, export_entries, gathered, host_copy
from zeroforge.trainer.moe import EXPERT_MODULE, autoep_model_types
from zeroforge.trainer.partitioned import full_shape

# The names AutoEP gives a block's parts (deepspeed/module_inject/auto_ep_layer.py); its experts keep
# transformers' name, EXPERT_MODULE.
ROUTER, SHARED, SHARED_GATE = "router", "shared_experts", "shared_experts_gate"


def autoep_blocks(model: torch.nn.Module) -> dict[str, Any]:
    """The model's AutoEP layers by module name (none: the model is as transformers built it)."""
    return {name: module for name, module in model.named_modules() if getattr(module, "_is_autoep_layer", False)}


def _all_experts(tensor: torch.Tensor, block: Any, dist: DistInfo) -> Optional[torch.Tensor]:
    """[experts, ...] from every expert-parallel rank's [local experts, ...], on rank 0's host."""
    import torch.distributed as tdist

    with gathered(tensor):
        local = tensor.detach().contiguous()
        if block.ep_size == 1:
            return local.to("cpu", copy=True) if dist.is_main else None
        parts = [torch.empty_like(local) for _ in range(block.ep_size)]
        tdist.all_gather(parts, local, group=block.ep_group)
        return torch.cat(parts).cpu() if dist.is_main else None


def _expert_entries(prefix: str, block: Any, preset: Any, plain_shapes: dict[str, tuple[int, ...]], dist: DistInfo) -> list[Entry]:
    experts = block.experts
    names = {w: f"{prefix}.{preset.experts_pattern}.{getattr(preset, 'expert_' + w)}" for w in ("w1", "w2")}
    dtype = experts.w1.dtype
    if preset.expert_w3 is not None:  # gate and up apart, as AutoEP keeps them
        names["w3"] = f"{prefix}.{preset.experts_pattern}.{preset.expert_w3}"

        def fetch(w: str) -> Callable[[], Optional[torch.Tensor]]:
            return lambda: _all_experts(getattr(experts, w), block, dist)

        return [Entry(names[w], plain_shapes[names[w]], dtype, fetch(w)) for w in ("w1", "w3", "w2")]
    fused, down = names["w1"], names["w2"]
    # transformers' fused gate-up is [experts, 2 x ffn, hidden] (gate first), or in some models
    # [experts, hidden, 2 x ffn] with down [experts, ffn, hidden]: told apart from the plain model's
    # two shapes as DeepSpeed told them apart to repack them.
    layout = classify_fused_gate_up_layout(plain_shapes[fused], plain_shapes[down])
    if layout is None:
        raise RuntimeError(f"{fused} {plain_shapes[fused]} and {down} {plain_shapes[down]}: not a fused expert layout AutoEP repacks")
    transposed = layout.needs_transpose

    def gate_up() -> Optional[torch.Tensor]:
        gate, up = _all_experts(experts.w1, block, dist), _all_experts(experts.w3, block, dist)
        if gate is None or up is None:
            return None
        return torch.cat([gate, up], dim=1) if not transposed else torch.cat([gate.transpose(1, 2), up.transpose(1, 2)], dim=2).contiguous()

    def down_proj() -> Optional[torch.Tensor]:
        w2 = _all_experts(experts.w2, block, dist)
        return w2 if w2 is None or not transposed else w2.transpose(1, 2).contiguous()

    return [Entry(fused, plain_shapes[fused], dtype, gate_up), Entry(down, plain_shapes[down], dtype, down_proj)]


def _renamed(name: str, prefix: str, preset: Any) -> str:
    """A block tensor's plain name: the router's under the block's router name, the shared experts' under theirs."""
    inner = name[len(prefix) + 1 :]
    part, _, rest = inner.partition(".")
    if part == ROUTER:
        rest = rest.removeprefix("gate.")  # AutoEP's router keeps the linear layer as `gate`
        return f"{prefix}.{preset.router_pattern}.{rest}"
    if part == SHARED:
        return f"{prefix}.{preset.shared_experts_pattern}.{rest}"
    if part == SHARED_GATE:
        return f"{prefix}.{preset.shared_experts_gate_pattern}.{rest}"
    return name


def plain_entries(model: torch.nn.Module, entries: list[tuple[str, torch.Tensor]], dist: DistInfo) -> list[Entry]:
    """The export of a model with AutoEP layers, in the plain layout; refused where a name or shape
    differs from the plain model's of the same config."""
    from deepspeed.module_inject.auto_ep_presets.registry import PRESET_MODELS
    from transformers import AutoModelForCausalLM

    config: Any = model.config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain_shapes = {name: tuple(t.shape) for name, t in export_entries(plain)}
    preset = PRESET_MODELS[autoep_model_types()[config.model_type]]
    blocks = autoep_blocks(model)
    out: list[Entry] = []
    done: set[str] = set()
    for name, tensor in entries:
        prefix = next((p for p in blocks if name.startswith(p + ".")), None)
        if prefix is None:
            out.append(Entry(name, tuple(full_shape(tensor)), tensor.dtype, host_copy(tensor, dist)))
        elif name.startswith(f"{prefix}.{EXPERT_MODULE}."):
            if prefix not in done:
                done.add(prefix)
                out += _expert_entries(prefix, blocks[prefix], preset, plain_shapes, dist)
        else:
            out.append(Entry(_renamed(name, prefix, preset), tuple(full_shape(tensor)), tensor.dtype, host_copy(tensor, dist)))
    ours = {e.name: e.shape for e in out}
    if ours != plain_shapes:
        differ = sorted(set(ours.items()) ^ set(plain_shapes.items()))
        raise RuntimeError(f"the export of {config.model_type}'s AutoEP layers does not give the plain transformers layout: {differ[:6]}")
    return out
