"""model.tiled_mlp: the MLPs run a slice of the sequence at a time, with the untiled losses and
gradients; the switch reaches the engine, and the plan counts what it saves."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama

from tests.conftest import engine_for, model_for_training
from zeroforge.launcher.memory import activation_bytes
from zeroforge.launcher.model_shape import model_shape
from zeroforge.trainer.config import compose_config
from zeroforge.trainer.engine import causal_lm_loss
from zeroforge.trainer.tiled_mlp import _tiled_forward, tile_mlps
from zeroforge.trainer.validate import validate


def _loss_and_grads(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = causal_lm_loss(model, tokens)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_tiled_mlps_run_slices_of_the_sequence_with_the_untiled_loss_and_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256
    )
    model = LlamaForCausalLM(config)
    tokens = torch.randint(0, 64, (2, 257), generator=torch.Generator().manual_seed(1))
    whole_loss, whole_grads = _loss_and_grads(model, tokens)

    lengths: list[int] = []
    plain_forward = modeling_llama.LlamaMLP.forward

    def spy(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        lengths.append(x.shape[-2])
        return plain_forward(self, x)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", spy)
    assert tile_mlps(model) == 2
    loss, grads = _loss_and_grads(model, tokens)
    torch.testing.assert_close(loss, whole_loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, whole_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    # 256 tokens a row over hidden size 32: 8 slices per MLP, of 32 tokens a row in the forward
    # (both layers), then of 64 tokens (the 2 rows flattened) in the backward's recompute.
    assert lengths == [32] * 8 * 2 + [64] * 8 * 2


def test_the_switch_reaches_the_engine_and_the_plan(process_group: None) -> None:
    cfg = compose_config(["model.tiled_mlp=true", "train.precision=fp32"])
    topology = validate(cfg, 1, cuda=False)
    engine = engine_for(model_for_training(cfg, topology, vocab_size=4096), cfg, topology)
    assert all(layer.mlp.forward.__func__ is _tiled_forward for layer in engine.module.model.layers)

    shape = model_shape(compose_config(["model=llama-8b", "model.vocab_size=128256"]).model, cfg.data)
    whole, tiled = (activation_bytes(shape, 1, 32768, 2, False, False, loss="chunked", tiled_mlp=t) for t in (False, True))
    # llama-8b keeps 4 x 2 bytes x 14,336 a token and layer in its MLP: more than half of it all.
    assert tiled.saved < 0.5 * whole.saved
