"""Bad steps on the real DeepSpeed engine: skipped with weights untouched, counted, and a run that
keeps failing stops. The faults are injected by a forward hook that scales the final norm's output,
which scales the logits (the output layer is linear) whichever loss computes them."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch

from tests.conftest import engine_for
from zeroforge.data.loader import BatchLoader
from zeroforge.data.prepare import prepare
from zeroforge.data.shards import TokenStore
from zeroforge.data.tokenizer import load_tokenizer
from zeroforge.trainer import distributed
from zeroforge.trainer.config import ConfigError, compose_config
from zeroforge.trainer.engine import train_step
from zeroforge.trainer.faults import FaultGuard, TrainingDiverged
from zeroforge.trainer.hf_export import gathered_tensors
from zeroforge.trainer.model import build_model, resolve_vocab_size
from zeroforge.trainer.validate import validate


class Run:
    """One process, a real engine, and a switch that poisons the next forward passes' logits."""

    def __init__(self, stage: int, data_cache: Path, dist: distributed.DistInfo, overrides: tuple[str, ...]):
        cfg = compose_config(
            [
                "experiment=smoke",
                f"data.cache_dir={data_cache}",
                f"deepspeed=zero{stage}",
                "train.precision=fp32",
                "logging.wandb.mode=disabled",
                "train.global_batch_size=4",
                *overrides,
            ]
        )
        plan = validate(cfg, 1, cuda=False)
        self.dist = dist
        prepared = prepare(cfg.data)
        tokenizer = load_tokenizer(prepared / "tokenizer")
        model = build_model(cfg.model, resolve_vocab_size(cfg.model, len(tokenizer)), tokenizer.eos_token_id)
        self.poison: float | None = None
        model.get_decoder().norm.register_forward_hook(self._hook)
        self.engine = engine_for(model, cfg, plan)
        self.guard = FaultGuard(cfg.train, self.engine.basic_optimizer, stage)
        self.loader = BatchLoader(
            TokenStore(prepared, "train"),
            cfg.data.seq_len,
            cfg.seed,
            cfg.train.global_batch_size,
            cfg.train.micro_batch_size,
            dp_rank=0,
            dp_size=1,
            consumed_samples=0,
        )
        self.step_count = 0

    def _hook(self, module, inputs, output):
        return output if self.poison is None else output * self.poison

    def step(self, poison: float | None = None) -> tuple[float, bool]:
        self.poison = poison
        self.step_count += 1
        loss, _, _, skipped = train_step(self.engine, self.loader.next_batch(), "cpu", True, self.guard, self.step_count)
        self.poison = None
        return float(loss), skipped

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in gathered_tensors(self.engine.module, self.dist)}


@pytest.fixture
def make_run(data_cache: Path, process_group: distributed.DistInfo) -> Iterator:
    yield lambda stage, *overrides: Run(stage, data_cache, process_group, overrides)


@pytest.mark.parametrize("stage,fused", [(0, False), (2, False), (3, False), (0, True), (2, True)])
def test_a_non_finite_step_is_skipped_and_the_run_goes_on(make_run, stage: int, fused: bool) -> None:
    """Also with torch's fused AdamW kernel (the CUDA default; torch has it on the CPU too)."""
    run = make_run(stage, f"optim.fused={str(fused).lower()}")
    assert run.engine.basic_optimizer.defaults["fused"] is fused
    assert run.step()[1] is False
    before = run.weights()
    loss, skipped = run.step(poison=float("nan"))
    assert skipped and run.guard.skipped == 1
    after = run.weights()
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step changed the weights"
    loss, skipped = run.step()
    assert not skipped and torch.isfinite(torch.tensor(loss))
    assert run.guard.in_a_row == 0
    assert any(not torch.equal(after[k], v) for k, v in run.weights().items()), "training did not go on"


def test_too_many_skips_in_a_row_stop_the_run(make_run) -> None:
    run = make_run(2, "train.max_consecutive_skips=2")
    run.step()
    run.step(poison=float("inf"))
    with pytest.raises(TrainingDiverged, match="2 optimizer steps in a row were skipped"):
        run.step(poison=float("nan"))


def test_the_loss_spike_guard_skips_a_spike(make_run) -> None:
    run = make_run(2, "train.spike_zscore=4", "train.spike_window=4")
    losses = [run.step() for _ in range(5)]
    assert not any(skipped for _, skipped in losses)
    before = run.weights()
    loss, skipped = run.step(poison=30.0)  # large logits: a finite, much higher loss
    assert skipped and loss > max(loss for loss, _ in losses)
    assert all(torch.equal(before[k], v) for k, v in run.weights().items())
    assert run.step()[1] is False


def test_spike_guard_with_an_offloaded_optimizer_is_refused() -> None:
    cfg = compose_config(["deepspeed=zero3-offload", "train.spike_zscore=4"])
    with pytest.raises(ConfigError, match="ZeRO-Offload's CPU Adam cannot skip a step"):
        validate(cfg, 1, cuda=False)
