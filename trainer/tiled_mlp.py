"""model.tiled_mlp: every decoder layer's MLP computed a slice of the sequence at a time, through
DeepSpeed's TiledMLP (ALST), so that its intermediates (gate, up, their product: 4 x the MLP width
per token) exist for one slice only; the backward recomputes each slice's forward. Numerically
the untiled MLP up to the order in which the slices' weight gradients are summed.
"""

from __future__ import annotations

import math
import types

import torch

from zeroforge.trainer.config import ConfigError


def _tiled_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    # Slices of about the hidden size in tokens: each slice's intermediates are then no larger
    # than the MLP's own weights.
    shards = max(1, math.ceil(x.shape[-2] / x.shape[-1]))
    return TiledMLP.apply(lambda module, part: type(module).forward(module, part), self, x, shards, list(self.parameters()))


def tile_mlps(model: torch.nn.Module) -> int:
    """Give every decoder layer's `mlp` (transformers' name for it) the tiled forward, in this
    instance; returns how many were tiled."""
    get_decoder = getattr(model, "get_decoder", None)
    layers = getattr(get_decoder(), "layers", None) if callable(get_decoder) else None
    mlps = [layer.mlp for layer in layers or () if isinstance(getattr(layer, "mlp", None), torch.nn.Module)]
    if not mlps:
        raise ConfigError(
            f"model.tiled_mlp=true tiles each decoder layer's `mlp`, which {type(model).__name__} does not have; set model.tiled_mlp=false"
        )
    for mlp in mlps:
        mlp.forward = types.MethodType(_tiled_forward, mlp)
    return len(mlps)
