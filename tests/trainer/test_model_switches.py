"""Activation checkpointing, torch.compile, the fused AdamW and the chunked loss change how the
model is run, not what it computes: the same losses and the plain model's checkpoint names."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import zeroforge.trainer.loss
from tests.conftest import REPO, engine_for, exact_overrides, run_module, train_losses

# dynamo's log (TORCH_LOGS=dynamo) names each frame it traces, "[<frame>/<attempt>] Step 1: torchdynamo
# start tracing <function> <file>:<line>", and says "[<frame>/<attempt>] Step 2: done compiler function"
# once it compiled that frame's graph. Compiling is lazy: a graph is made when a step first calls it.
TRACED = re.compile(r"\[(\d+/\d+)\] Step 1: torchdynamo start tracing (\S+) (\S+):\d+")
COMPILED = re.compile(r"\[(\d+/\d+)\] Step 2: done compiler function")


def compiled_graphs(log: str) -> list[tuple[str, str]]:
    """(function, file name) of every graph that the run compiled."""
    traced = {frame: (function, Path(path).name) for frame, function, path in TRACED.findall(log)}
    return [traced[frame] for frame in COMPILED.findall(log)]


# The whole model: its forward with the loss (trainer/loss.py installs it). A decoder block: one
# graph that all of them share.
WHOLE_MODEL = [("forward", Path(zeroforge.trainer.loss.__file__).name)]
BLOCKS = [(LlamaDecoderLayer.forward.__code__.co_name, Path(LlamaDecoderLayer.forward.__code__.co_filename).name)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "switch,rtol,graphs",
    [
        ("model.activation_checkpointing=true", 0.0, []),
        ("model.compile=full", 1e-4, WHOLE_MODEL),
        # Regional compile (each decoder block in place) with torch's fused AdamW kernel (CPU too).
        ("model.compile=regional optim.fused=true", 1e-4, BLOCKS),
    ],
)
def test_switch_keeps_losses_and_checkpoint_names(
    switch: str, rtol: float, graphs: list[tuple[str, str]], single_process_run: Path, data_cache: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "TORCH_LOGS": "dynamo"}
    result = run_module("zeroforge.trainer.train", [*exact_overrides(data_cache, run_dir, 0), *switch.split()], cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert compiled_graphs(result.stderr) == graphs
    torch.testing.assert_close(torch.tensor(train_losses(run_dir)), torch.tensor(train_losses(single_process_run)), rtol=rtol, atol=1e-6)
    # Saved under the plain model's names: no `_orig_mod.` or wrapper prefixes.
    ref = load_file(single_process_run / "export" / "model.safetensors")
    assert sorted(load_file(run_dir / "export" / "model.safetensors")) == sorted(ref)


@pytest.mark.slow
def test_the_defaults_train_the_tiny_model_like_before(single_process_run: Path, plain_loss_run: Path) -> None:
    """All defaults (on the CPU: the chunked loss) against every feature off (the plain loss, as
    the trainer computed it before): 20 logged steps, within fp32 rounding."""
    from zeroforge.trainer.config import compose_config
    from zeroforge.trainer.loss import resolve_loss

    defaults = compose_config()
    assert resolve_loss(defaults.train.loss, defaults.model.model_type) == "chunked"
    found, expected = train_losses(single_process_run), train_losses(plain_loss_run)
    assert len(found) == len(expected) == 20 and expected[0] > expected[-1] + 1.0  # it learned
    torch.testing.assert_close(torch.tensor(found), torch.tensor(expected), rtol=1e-5, atol=0)
    ref = load_file(plain_loss_run / "export" / "model.safetensors")
    got = load_file(single_process_run / "export" / "model.safetensors")
    assert sorted(got) == sorted(ref)


def test_activation_checkpointing_recomputes_every_block_in_the_backward(process_group) -> None:
    from zeroforge.trainer.config import compose_config
    from zeroforge.trainer.engine import causal_lm_loss
    from zeroforge.trainer.model import build_model
    from zeroforge.trainer.validate import validate

    cfg = compose_config(["deepspeed=zero0", "train.precision=fp32", "model.vocab_size=512", "model.activation_checkpointing=true"])
    engine = engine_for(build_model(cfg.model, 512), cfg, validate(cfg, 1, cuda=False))
    assert engine.module.is_activation_checkpointing
    # Counted on the attention: transformers checkpoints a block's forward but not the block's own
    # hooks, and the recompute stops once the last activation is back (inside the MLP).
    runs = [0] * cfg.model.num_layers
    for i, block in enumerate(engine.module.get_decoder().layers):
        block.self_attn.register_forward_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
    engine.train()  # as train_step(): checkpointing acts only in training mode
    loss = causal_lm_loss(engine, torch.randint(0, 512, (2, 17)))
    assert runs == [1] * cfg.model.num_layers
    engine.backward(loss)
    assert runs == [2] * cfg.model.num_layers  # each block ran again to give its activations back
    engine.destroy()
