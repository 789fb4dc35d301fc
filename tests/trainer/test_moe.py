"""Mixtures of experts: the router's load-balancing loss as transformers computes it, DeepSpeed's
AutoEP sharding the experts over 2 gloo ranks with one process's losses, ZeRO-3 with experts that
receive no token, resume on another parallel.expert, the plain HF export, and bad input refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch

from tests.conftest import REPO, engine_for, exact_overrides, model_for_training, read_metrics, run_distributed, run_module, train_losses
from zeroforge.trainer.config import ConfigError, compose_config
from zeroforge.trainer.validate import validate

# The tiny MoE of the end-to-end runs: 10 logged fp32 steps under ZeRO-2, checkpoints every 5.
MOE = ["model=tiny-moe", "train.steps=10", "optim.warmup_steps=2", "checkpoint.every=5"]
# A tiny OLMoE: a MoE that AutoEP has no preset for, trained as transformers builds it.
OLMOE = ["model=tiny-moe", "model.model_type=olmoe", "model.intermediate_size=32"]


def _small(*overrides: str) -> list[str]:
    return ["train.precision=fp32", "train.micro_batch_size=2", "train.global_batch_size=4", "data.seq_len=16", *overrides]


@pytest.mark.parametrize(
    "overrides,world_size,expected",
    [
        (["parallel.expert=2"], 2, "parallel.expert=2 needs a mixture-of-experts model, but model=tiny (llama) is dense"),
        (
            ["model=tiny-moe", "parallel.expert=3", "train.global_batch_size=48"],
            6,
            "model=tiny-moe has 4 experts per layer, not divisible by parallel.expert=3; expected one of [1, 2, 4]",
        ),
        (
            ["model=olmoe-1b-7b", "parallel.expert=2"],
            2,
            "parallel.expert=2: DeepSpeed's AutoEP cannot shard model_type 'olmoe' (model=olmoe-1b-7b); it shards ['deepseek_v2', ",
        ),
        (["model=tiny-moe", "parallel.sequence=2", "data.seq_len=64"], 2, "parallel.sequence=2 with a mixture of experts (model=tiny-moe)"),
        (["model=tiny-moe", "parallel.expert=2", "deepspeed=zero0"], 2, "parallel.expert=2 needs ZeRO 1-3, found deepspeed stage 0"),
        (
            ["model=tiny-moe", "model.model_type=deepseek_v2", "model.extra.router_aux_loss_coef=0.01"],
            2,
            "AutoEP layer for deepseek_v2 does not hand out the router logits its load-balancing loss needs",
        ),
    ],
    ids=["dense-model", "indivisible-experts", "unsupported-type", "sequence-parallel", "zero0", "no-router-logits"],
)
def test_what_expert_parallelism_cannot_serve_is_refused_with_the_numbers(overrides: list[str], world_size: int, expected: str) -> None:
    with pytest.raises(ConfigError) as refused:
        validate(compose_config(["train.micro_batch_size=1", "train.global_batch_size=8", *overrides]), world_size, cuda=False)
    assert expected in str(refused.value)


def test_the_launcher_refuses_an_indivisible_expert_split_before_torchrun(data_cache: Path, tmp_path: Path) -> None:
    args = [f"data.cache_dir={data_cache}", f"run.dir={tmp_path}", "model=tiny-moe", "parallel.expert=3", "cluster.nproc_per_node=3"]
    result = run_module("zeroforge.launcher", [*args, "train.global_batch_size=48"], cwd=REPO, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "not divisible by parallel.expert=3" in result.stderr and "launching" not in result.stdout + result.stderr


def test_every_config_names_its_experts_count_its_own_way() -> None:
    from transformers import AutoConfig

    from zeroforge.trainer.moe import num_experts

    counts = {
        t: num_experts(AutoConfig.for_model(t))
        for t in ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v2", "deepseek_v3", "llama")
    }
    assert counts == {"qwen3_moe": 128, "qwen2_moe": 60, "mixtral": 8, "olmoe": 64, "deepseek_v2": 64, "deepseek_v3": 256, "llama": 0}


@pytest.mark.parametrize("loss", ["plain", "chunked"])
def test_the_load_balancing_loss_is_transformers_own(loss: str) -> None:
    """The loss forward of either loss hands out the router logits; their load-balancing loss is
    the one transformers' own forward returns, and the tokens per expert are its top-k choices."""
    from zeroforge.trainer.engine import forward_losses
    from zeroforge.trainer.loss import install_loss
    from zeroforge.trainer.model import build_model

    cfg = compose_config(["model=tiny-moe"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 128)
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
    expected = model(input_ids=tokens[:, :-1], output_router_logits=True)
    install_loss(model, loss, 8)
    lm, routed = forward_losses(model, tokens)
    assert routed is not None
    torch.testing.assert_close(routed.aux_loss, expected.aux_loss, rtol=0, atol=0)
    torch.testing.assert_close(lm, torch.nn.functional.cross_entropy(expected.logits.flatten(0, 1), tokens[:, 1:].flatten()))
    assert routed.expert_tokens.shape == (2, 4)  # layers x experts
    assert routed.expert_tokens.sum(dim=1).tolist() == [16 * 2 * 2] * 2  # every token's 2 experts in each layer
    routed.aux_loss.backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0  # the loss trains the router


def test_a_dead_expert_is_named_once_after_its_intervals() -> None:
    from zeroforge.trainer.routing import ExpertLoad

    load = ExpertLoad(dead_intervals=2)
    warnings = []
    for _ in range(4):
        load.add(torch.tensor([[6.0, 2.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]]))
        record, new = load.interval()
        warnings.append(new)
    assert record["expert_share"][0] == [0.75, 0.25, 0.0, 0.0]
    assert record["experts/layer_0/imbalance"] == 3.0 and record["experts/layer_1/imbalance"] == 1.0
    assert record["experts/layer_0/dead"] == 2 and record["dead_experts"] == 2
    assert [len(w) for w in warnings] == [0, 2, 0, 0]
    assert "MoE layer 0: expert 2 received no token for 2 logging intervals in a row" in warnings[1][0]


def _expert_parallel_holds_half_and_exports_the_plain_layout(out: str, tokenizer_dir: str) -> None:
    """On each of 2 ranks: AutoEP with parallel.expert=2 keeps this rank's half of every layer's
    experts, computes the plain model's logits, and the export loads in transformers as that model."""
    from transformers import AutoModelForCausalLM

    from zeroforge.data.tokenizer import load_tokenizer
    from zeroforge.trainer import distributed
    from zeroforge.trainer.engine import forward_losses
    from zeroforge.trainer.hf_export import export_hf

    info = distributed.init_distributed("cpu")
    tokenizer = load_tokenizer(tokenizer_dir)
    cfg = compose_config(_small("model=tiny-moe", "deepspeed=zero1", "parallel.expert=2"))
    topology = validate(cfg, 2)
    torch.manual_seed(0)
    model = model_for_training(cfg, topology, len(tokenizer))
    gate_up = model.model.layers[1].mlp.experts.gate_up_proj.detach().clone()  # [4 experts, gate then up, hidden]
    all_experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    tokens = torch.randint(0, len(tokenizer), (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens).logits
        plain_aux = forward_losses(model, tokens).routing.aux_loss
    engine = engine_for(model, cfg, topology)
    experts = engine.module.model.layers[1].mlp.experts
    mine = slice(2 * info.rank, 2 * info.rank + 2)
    torch.testing.assert_close(experts.w1.data, gate_up[mine, :32], rtol=0, atol=0)
    torch.testing.assert_close(experts.w3.data, gate_up[mine, 32:], rtol=0, atol=0)
    held = sum(p.numel() for n, p in engine.module.named_parameters() if ".experts." in n)
    assert held * 2 == all_experts == 2 * gate_up.numel() * 3 // 2  # 2 layers of gate, up and down
    engine.eval()
    with torch.no_grad():
        torch.testing.assert_close(engine(tokens).logits, expected, rtol=1e-5, atol=1e-6)
        # AutoEP's router hands transformers the raw logits: the load-balancing loss is the plain model's.
        torch.testing.assert_close(forward_losses(engine, tokens).routing.aux_loss, plain_aux, rtol=1e-6, atol=0)
    export_hf(engine, tokenizer, out, info, {}, shard_bytes=2**30)
    if info.is_main:
        loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(loaded(tokens).logits, expected, rtol=0, atol=0)
    distributed.close()


def test_expert_parallel_ranks_hold_half_the_experts_and_export_the_plain_model(data_cache: Path, tmp_path: Path) -> None:
    from zeroforge.data.prepare import prepare

    tokenizer_dir = prepare(compose_config([f"data.cache_dir={data_cache}"]).data) / "tokenizer"
    run_distributed(_expert_parallel_holds_half_and_exports_the_plain_layout, str(tmp_path / "export"), str(tokenizer_dir), timeout_s=300)


def _experts_without_tokens_under_zero3(model: list[str]) -> None:
    """ZeRO-3 on 2 ranks with every token routed to the same two experts: with parallel.expert=2
    one rank's experts receive none; a plain transformers MoE's blocks are ZeRO-3 leaves. Two steps finish."""
    from deepspeed import zero
    from deepspeed.utils import z3_leaf_module

    from zeroforge.trainer import distributed
    from zeroforge.trainer.engine import train_step
    from zeroforge.trainer.faults import FaultGuard

    info = distributed.init_distributed("cpu")
    cfg = compose_config(_small(*model, "deepspeed=zero3", "model.vocab_size=128"))
    topology = validate(cfg, 2)
    torch.manual_seed(0)
    built = model_for_training(cfg, topology, 128)
    routers = [layer.mlp.gate.weight for layer in built.model.layers]
    with zero.GatheredParameters(routers, modifier_rank=0):
        for weight in routers:
            weight.data.zero_()  # every expert ties, and top-k takes the same two for every token
    engine = engine_for(built, cfg, topology)
    if topology.expert == 1:
        assert all(z3_leaf_module(layer.mlp) for layer in engine.module.model.layers)
    guard = FaultGuard(cfg.train, engine.basic_optimizer, 3)
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(info.rank))
    result = train_step(engine, [tokens], "cpu", True, guard, 1)
    assert result.expert_tokens is not None
    # In every layer one pair of experts (one expert-parallel rank's) received every token, the other none.
    received = (result.expert_tokens > 0).tolist()
    assert all(layer in ([True, True, False, False], [False, False, True, True]) for layer in received), received
    assert torch.isfinite(train_step(engine, [tokens], "cpu", True, guard, 2).loss)
    distributed.close()


@pytest.mark.parametrize("model", [["model=tiny-moe", "parallel.expert=2"], OLMOE], ids=["autoep", "plain-olmoe"])
def test_zero3_finishes_when_experts_receive_no_tokens(model: list[str]) -> None:
    run_distributed(_experts_without_tokens_under_zero3, model, timeout_s=240)


@pytest.fixture(scope="module")
def moe_runs(two_rank_run: Callable[..., tuple[Path, str]]) -> dict[str, tuple[Path, str]]:
    """The tiny MoE on 2 ranks under ZeRO-2, every expert on each rank and half of them on each."""
    return {f"expert{e}": two_rank_run(2, *MOE, f"parallel.expert={e}") for e in (1, 2)}


@pytest.mark.slow
def test_expert_parallel_training_gives_the_replicated_losses(moe_runs: dict[str, tuple[Path, str]]) -> None:
    (replicated, _), (sharded, stdout) = moe_runs["expert1"], moe_runs["expert2"]
    assert "world size 2 (sequence parallel 1, expert parallel 2)" in stdout
    expected, found = train_losses(replicated), train_losses(sharded)
    assert len(found) == len(expected) == 10
    torch.testing.assert_close(torch.tensor(found), torch.tensor(expected), rtol=1e-5, atol=0)
    records = [r for r in read_metrics(sharded) if "loss" in r]
    assert all(0 < r["aux_loss"] < 4 for r in records)  # tiny-moe's coefficient is 0.01; balanced routing gives 2
    for record in records:
        assert len(record["expert_share"]) == 2 and all(abs(sum(layer) - 1) < 1e-3 for layer in record["expert_share"])
        assert record["experts/layer_1/imbalance"] >= 1.0


@pytest.mark.slow
def test_a_resume_on_another_expert_split_continues_the_losses(
    moe_runs: dict[str, tuple[Path, str]], data_cache: Path, tmp_path: Path
) -> None:
    (replicated, _), (sharded, _) = moe_runs["expert1"], moe_runs["expert2"]
    step = sharded / "checkpoints" / "step_0000005"
    args = [*exact_overrides(data_cache, tmp_path / "run", 2), *MOE, "parallel.expert=1", f"checkpoint.resume={step}"]
    result = run_module("zeroforge.launcher", [*args, "cluster.nproc_per_node=2", "launcher.harness=false"], cwd=REPO)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "saved with parallel.expert=2; resuming with parallel.expert=1 through DeepSpeed's universal checkpoint" in output
    expected, found = train_losses(replicated)[5:], train_losses(tmp_path / "run")
    torch.testing.assert_close(torch.tensor(found), torch.tensor(expected), rtol=1e-5, atol=0)
    # The exports of both splits are the plain transformers model, with the same weights.
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(0))
    logits = []
    for run in (sharded, tmp_path / "run"):
        assert json.loads((run / "export" / "config.json").read_text())["architectures"] == ["Qwen3MoeForCausalLM"]
        with torch.no_grad():
            logits.append(AutoModelForCausalLM.from_pretrained(run / "export", dtype=torch.float32)(tokens).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_the_checkpoint_reader_refuses_expert_layers_and_names_the_way_to_an_export(moe_runs: dict[str, tuple[Path, str]]) -> None:
    from zeroforge.trainer.consolidate import checkpoint_weights

    sharded, _ = moe_runs["expert2"]
    with pytest.raises(ConfigError, match=r"expert layers of DeepSpeed's AutoEP .* resume it with train.steps=5 \(it writes the export"):
        checkpoint_weights(sharded / "checkpoints" / "step_0000005")
