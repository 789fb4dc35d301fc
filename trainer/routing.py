"""The router's side of a mixture of experts: its load-balancing loss, as the model's own
transformers code computes it, and how many tokens each expert received, per step and per
logging interval (metrics.jsonl, wandb, a warning for an expert that stays dead)."""

from __future__ import annotations

import sys
from typing import Any, NamedTuple, Optional

import torch

from zeroforge.trainer.moe import autoep_hands_out_router_logits, autoep_serves, experts_per_token, num_experts


class Routing(NamedTuple):
    """One forward's load-balancing loss (as transformers computes it, before its coefficient)
    and how many tokens each expert of each MoE layer received ([layers, experts])."""

    aux_loss: torch.Tensor
    expert_tokens: torch.Tensor


def routes_tokens(model: torch.nn.Module) -> bool:
    """A transformers MoE whose forward hands out its router's raw logits (through AutoEP's layer
    only where AutoEP records them; trainer/moe.py)."""
    config = getattr(getattr(model, "module", model), "config", None)
    if config is None or num_experts(config) == 0 or not hasattr(config, "output_router_logits"):
        return False
    return not autoep_serves(config) or autoep_hands_out_router_logits(config.model_type)


def routing(model: torch.nn.Module, router_logits: Optional[tuple[torch.Tensor, ...]]) -> Optional[Routing]:
    """The load-balancing loss of the model's own modeling module (`load_balancing_loss_func`,
    with the arguments its causal-LM forward passes, no attention mask: every position counts)
    and the tokens per expert, top-k of the same softmax the loss counts."""
    if not router_logits:
        return None
    plain: Any = getattr(model, "module", model)
    loss_func = getattr(sys.modules[type(plain).__module__], "load_balancing_loss_func", None)
    experts, top_k = num_experts(plain.config), experts_per_token(plain.config)
    if loss_func is None:
        aux = torch.zeros((), device=router_logits[0].device)
    else:
        aux = loss_func(router_logits, experts, top_k, None)
    with torch.no_grad():
        chosen = torch.stack([torch.topk(layer.float().softmax(dim=-1), top_k, dim=-1).indices.flatten() for layer in router_logits])
        tokens = torch.zeros(len(router_logits), experts, device=chosen.device).scatter_add_(
            1, chosen, torch.ones_like(chosen, dtype=torch.float32)
        )
    return Routing(aux, tokens)


def router_aux_loss_coef(model: torch.nn.Module) -> float:
    """The coefficient the model's config sets (model.extra.router_aux_loss_coef); 0 without one."""
    config = getattr(model, "module", model).config
    return float(getattr(config, "router_aux_loss_coef", None) or 0.0)


class ExpertLoad:
    """The tokens each expert received over a logging interval, summed over the ranks, as
    metrics.jsonl and wandb show them: per MoE layer (numbered among the MoE layers, a dense
    layer has none) the share of each expert, the imbalance (the busiest expert's share over the
    mean share) and the dead experts (no token at all); an expert dead for `dead_intervals`
    intervals in a row is warned about once (again if it revives and dies)."""

    def __init__(self, dead_intervals: int):
        self.dead_intervals = dead_intervals
        self._tokens: Optional[torch.Tensor] = None
        self._dead_for: Optional[torch.Tensor] = None
        self._warned: set[tuple[int, int]] = set()

    def add(self, expert_tokens: torch.Tensor) -> None:
        self._tokens = expert_tokens.detach() if self._tokens is None else self._tokens + expert_tokens.detach()

    def interval(self) -> tuple[dict[str, Any], list[str]]:
        """This interval's record fields and new warnings (every rank calls it: it sums over them)."""
        import torch.distributed as dist

        if self._tokens is None:
            return {}, []
        tokens = self._tokens.clone()
        self._tokens = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(tokens)
        tokens = tokens.cpu()
        share = tokens / tokens.sum(dim=1, keepdim=True).clamp(min=1)
        dead = tokens == 0
        self._dead_for = dead.long() if self._dead_for is None else (self._dead_for + 1) * dead
        record: dict[str, Any] = {
            "expert_imbalance_max": round(float((share.max(dim=1).values * share.shape[1]).max()), 4),
            "dead_experts": int(dead.sum()),
            "expert_share": [[round(float(s), 4) for s in layer] for layer in share],
        }
        for layer in range(share.shape[0]):
            record[f"experts/layer_{layer}/imbalance"] = round(float(share[layer].max() * share.shape[1]), 4)
            record[f"experts/layer_{layer}/dead"] = int(dead[layer].sum())
        warnings = []
        self._warned -= {(layer, expert) for layer, expert in (~dead).nonzero().tolist()}  # revived: warned again if it dies
        for layer, expert in (self._dead_for >= self.dead_intervals).nonzero().tolist():
            if (layer, expert) not in self._warned:
                self._warned.add((layer, expert))
                warnings.append(
                    f"MoE layer {layer}: expert {expert} received no token for {self.dead_intervals} logging intervals in a row "
                    "(a dead expert; raise model.extra.router_aux_loss_coef to balance the routing)"
                )
        return record, warnings
