"""Bad steps on the real DeepSpeed engine: skipped with weights untouched, counted, and a run that
keeps failing stops. The faults are injected by a forward hook that scales the final norm's output,
which scales the logits (the output layer is linear) whichever loss computes them."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import deepspeed
import pytest
import torch

from tests.conftest import engine_for, run_distributed
from zeroforge.data.loader import BatchLoader
from zeroforge.data.prepare import prepare
from zeroforge.data.shards import TokenStore
from zeroforge.data.tokenizer import load_tokenizer
from zeroforge.trainer import distributed
from zeroforge.trainer.config import ConfigError, compose_config
from zeroforge.trainer.engine import train_step
from zeroforge.trainer.faults import FaultGuard, TrainingDiverged
from zeroforge.trainer.model import build_model, resolve_vocab_size
from zeroforge.trainer.validate import validate


class Run:
    """One rank's real engine and data, and a switch that poisons its next forward passes' logits."""

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
        plan = validate(cfg, dist.world_size, cuda=False)
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
            dp_rank=dist.rank,
            dp_size=dist.world_size,
            consumed_samples=0,
        )
        self.step_count = 0

    def _hook(self, module, inputs, output):
        return output if self.poison is None else output * self.poison

    def step(self, poison: float | None = None) -> tuple[float, bool]:
        self.poison = poison
        self.step_count += 1
        result = train_step(self.engine, self.loader.next_batch(), "cpu", True, self.guard, self.step_count)
        self.poison = None
        return float(result.loss), result.skipped

    def weights(self) -> dict[str, torch.Tensor]:
        """This rank's copy of every weight (ZeRO-3's gathered from the shards)."""
        params = dict(self.engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {k: v.detach().clone() for k, v in params.items()}


@pytest.fixture
def make_run(data_cache: Path, process_group: distributed.DistInfo) -> Iterator:
    yield lambda stage, *overrides: Run(stage, data_cache, process_group, overrides)


# Each set-up decides the skip in its own place: without ZeRO FaultGuard judges the loss (reduced
# across ranks) and the reduced gradients' norm, in bf16 beside DeepSpeed's wrapper of the
# optimizer; under ZeRO 1-3 DeepSpeed's optimizer judges the reduced gradients. Also with torch's
# fused AdamW kernel (the CUDA default; torch has it on the CPU too).
POISONED_CASES = [
    (0, "fp32", False),
    (0, "bf16", True),  # a single GPU's defaults
    (1, "bf16", False),
    (2, "fp32", True),
    (3, "fp32", False),
]


def _one_rank_poisoned(data_cache: str, out: str) -> None:
    """Every case on these 2 ranks: a NaN in rank 1's logits only skips the step on both ranks,
    with the weights untouched on both, and the next step trains on both."""
    dist = distributed.init_distributed("cpu")
    for stage, precision, fused in POISONED_CASES:
        case = f"rank {dist.rank}, ZeRO-{stage} {precision}{' fused' if fused else ''}"
        overrides = (f"train.precision={precision}", f"optim.fused={str(fused).lower()}", "train.micro_batch_size=2", "data.seq_len=16")
        run = Run(stage, Path(data_cache), dist, overrides)
        assert run.engine.bfloat16_enabled() is (precision == "bf16") and run.engine.basic_optimizer.defaults["fused"] is fused, case
        assert run.step()[1] is False, case
        before = run.weights()
        _, skipped = run.step(poison=float("nan") if dist.rank == 1 else None)
        assert skipped and run.guard.skipped == 1, f"{case}: the step with rank 1's NaN was not skipped"
        after = run.weights()
        assert all(torch.equal(before[k], after[k]) for k in before), f"{case}: a skipped step changed the weights"
        loss, skipped = run.step()
        assert not skipped and torch.isfinite(torch.tensor(loss)) and run.guard.in_a_row == 0, case
        assert any(not torch.equal(after[k], v) for k, v in run.weights().items()), f"{case}: training did not go on"
        run.engine.destroy()
    Path(out, f"rank{dist.rank}").touch()
    distributed.close()


def test_a_non_finite_step_on_one_rank_is_skipped_on_every_rank(data_cache: Path, tmp_path: Path) -> None:
    run_distributed(_one_rank_poisoned, str(data_cache), str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0", "rank1"]


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
