"""The chunked loss (trainer/loss.py) equals the plain `logits.float()` loss, values and gradients,
and leaves the model plain: logits, generation, state dict names and deep copies as before."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO, TORCHRUN, engine_for, exact_overrides, run_module, train_losses
from zeroforge.data.boundaries import DocumentBoundaries
from zeroforge.trainer.config import compose_config
from zeroforge.trainer.engine import causal_lm_loss
from zeroforge.trainer.loss import chunked_cross_entropy, install_loss, installed_loss, resolve_loss
from zeroforge.trainer.model import build_model
from zeroforge.trainer.validate import validate

VOCAB = 512
EOS = 0


def _models(tied: bool, chunk_tokens: int, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The tiny model twice with the same weights: plain, and with the chunked loss installed."""
    torch.manual_seed(0)
    plain = build_model(compose_config([f"model.tie_word_embeddings={str(tied).lower()}"]).model, VOCAB).to(dtype)
    plain.config.use_cache = False
    chunked = copy.deepcopy(plain)
    install_loss(chunked, "chunked", chunk_tokens)
    return plain, chunked


def _tokens(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (3, 97), generator=generator)
    tokens[:, [10, 40, 41, 80]] = EOS  # documents end inside the windows
    return tokens


def _assert_grads_equal(plain: torch.nn.Module, chunked: torch.nn.Module, tol: float) -> None:
    """Every parameter's gradient within tol of its largest entry (so tiny entries don't decide)."""
    for (name, p), (_, q) in zip(plain.named_parameters(), chunked.named_parameters()):
        scale = p.grad.abs().max().item()
        assert (p.grad.float() - q.grad.float()).abs().max().item() <= tol * scale, name


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(
    "chunk_tokens,boundaries",
    [
        (64, None),
        (7, DocumentBoundaries(EOS, reset_position_ids=True, mask_cross_document_loss=True)),
        (100_000, DocumentBoundaries(EOS, mask_cross_document_loss=True)),
    ],
)
def test_chunked_loss_equals_the_plain_loss_and_its_gradients(tied: bool, chunk_tokens: int, boundaries) -> None:
    plain, chunked = _models(tied, chunk_tokens)
    assert installed_loss(plain) == "plain" and installed_loss(chunked) == "chunked"
    tokens = _tokens()
    expected = causal_lm_loss(plain, tokens, boundaries)
    found = causal_lm_loss(chunked, tokens, boundaries)
    assert found.item() == pytest.approx(expected.item(), rel=1e-6)
    expected.backward()
    found.backward()
    # fp32 sums the chunks in another order, and four layers of backward carry that rounding: a full
    # suite run measured 1.1e-6 of the largest entry; a lost chunk or a wrong mask is off by far more.
    _assert_grads_equal(plain, chunked, 1e-5)
    if tied:
        assert chunked.lm_head.weight is chunked.get_input_embeddings().weight


def test_gradients_scale_with_the_incoming_gradient() -> None:
    """DeepSpeed's backward scales the loss (by 1 / gradient accumulation steps)."""
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (50,))
    targets[::5] = -100
    (0.25 * F.cross_entropy(F.linear(hidden, weight), targets)).backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (0.25 * chunked_cross_entropy(hidden, weight, targets, 16)).backward()
    torch.testing.assert_close(hidden.grad, expected[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad, expected[1], rtol=1e-5, atol=1e-7)


def test_in_bf16_the_chunked_loss_stays_within_bf16_rounding() -> None:
    plain, chunked = _models(False, 64, torch.bfloat16)
    tokens = _tokens()
    expected, found = causal_lm_loss(plain, tokens), causal_lm_loss(chunked, tokens)
    assert found.dtype == torch.float32
    assert found.item() == pytest.approx(expected.item(), rel=1e-3)
    expected.backward()
    found.backward()
    _assert_grads_equal(plain, chunked, 2**-6)


def test_the_model_stays_plain_for_evaluation_generation_and_export() -> None:
    plain, chunked = _models(True, 16)
    tokens = _tokens()
    with torch.no_grad():
        # Validation through the loss forward takes the chunked loss without building gradients.
        assert causal_lm_loss(chunked, tokens).item() == pytest.approx(causal_lm_loss(plain, tokens).item(), rel=1e-6)
        assert torch.equal(chunked(input_ids=tokens).logits, plain(input_ids=tokens).logits)
    prompt = tokens[:1, :8]
    assert torch.equal(
        chunked.generate(prompt, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(prompt)),
        plain.generate(prompt, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(prompt)),
    )
    assert list(chunked.state_dict()) == list(plain.state_dict())
    twin = copy.deepcopy(chunked)
    assert twin.forward.__self__ is twin and twin.lm_head.forward.__self__ is twin.lm_head
    assert installed_loss(twin) == "chunked"


def test_auto_takes_the_chunked_loss_only_where_it_is_exact() -> None:
    assert resolve_loss("auto", "llama") == "chunked"
    assert resolve_loss("auto", "granite") == "plain"  # granite divides its logits by a scale
    assert resolve_loss("plain", "llama") == "plain"


def test_liger_loss_gets_weight_hidden_and_targets_in_its_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """liger_kernel needs Triton and CUDA; a stand-in of its documented class checks the wiring."""
    import types

    class LigerFusedLinearCrossEntropyLoss(torch.nn.Module):
        def __init__(self, ignore_index: int = -100):
            super().__init__()
            self.ignore_index = ignore_index

        def forward(self, lin_weight, _input, target, bias=None):
            return F.cross_entropy(F.linear(_input, lin_weight).float(), target, ignore_index=self.ignore_index)

    module = types.ModuleType("liger_kernel.transformers.fused_linear_cross_entropy")
    module.LigerFusedLinearCrossEntropyLoss = LigerFusedLinearCrossEntropyLoss
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.fused_linear_cross_entropy", module)
    plain, liger = _models(False, 64)
    install_loss(liger, "liger", 64)  # replaces the chunked forward of _models
    boundaries = DocumentBoundaries(EOS, mask_cross_document_loss=True)
    tokens = _tokens()
    assert causal_lm_loss(liger, tokens, boundaries).item() == pytest.approx(causal_lm_loss(plain, tokens, boundaries).item(), rel=1e-6)


@pytest.mark.parametrize("stage", [0, 3])
def test_through_the_deepspeed_engine_the_losses_equal_the_plain_ones(stage: int, process_group) -> None:
    """ZeRO-3 gathers the output layer's weight in its module's forward: the loss must run there."""
    batches = [_tokens(seed) for seed in range(4)]
    losses = {}
    for loss in ("plain", "chunked"):
        cfg = compose_config(
            [
                "train.precision=fp32",
                f"deepspeed.stage={stage}",
                "train.micro_batch_size=3",
                "train.global_batch_size=3",
                f"train.loss={loss}",
                "train.loss_chunk_tokens=100",
                "optim.warmup_steps=1",
                "optim.lr=1e-2",
            ]
        )
        torch.manual_seed(0)
        engine = engine_for(build_model(cfg.model, VOCAB), cfg, validate(cfg, 1, cuda=False))
        losses[loss] = []
        for batch in batches:
            value = causal_lm_loss(engine, batch)
            engine.backward(value)
            engine.step()
            losses[loss].append(value.item())
        engine.destroy()
    assert losses["plain"][0] != losses["plain"][-1]  # the weights moved
    torch.testing.assert_close(torch.tensor(losses["chunked"]), torch.tensor(losses["plain"]), rtol=1e-6, atol=0)


@pytest.mark.slow
def test_two_ranks_under_zero3_train_like_one_process_with_the_plain_loss(plain_loss_run: Path, data_cache: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_module(
        "zeroforge.trainer.train",
        [*exact_overrides(data_cache, run_dir, 3), "train.loss=chunked"],
        cwd=REPO,
        launcher=TORCHRUN,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "world size 2" in result.stdout and "loss chunked" in result.stdout
    expected, found = train_losses(plain_loss_run), train_losses(run_dir)
    assert len(found) == len(expected) == 20
    torch.testing.assert_close(torch.tensor(found), torch.tensor(expected), rtol=1e-5, atol=0)


def test_in_bf16_the_incoming_gradient_scales_in_fp32() -> None:
    """A factor of 1/3 (3 accumulation steps) is applied before the one rounding to bf16, as the
    plain loss's autograd does, not rounded to bf16 itself first."""
    torch.manual_seed(0)
    hidden = torch.randn(40, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(200, 16, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 200, (40,))
    (chunked_cross_entropy(hidden, weight, targets, 16) / 3).backward()
    scaled = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    chunked_cross_entropy(hidden, weight, targets, 16).backward()
    for got, full in zip(scaled, (hidden.grad, weight.grad)):
        assert torch.equal(got, (full.float() * torch.tensor(1 / 3)).to(torch.bfloat16))
