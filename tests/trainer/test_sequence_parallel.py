"""Ulysses sequence parallelism: each of 2 gloo ranks computes half of every sequence, and the
group's loss and gradients are the unsplit model's; end to end, training on parallel.sequence=2
gives one process's losses."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from tests.conftest import REPO, TORCHRUN, exact_overrides, run_distributed, run_module, train_losses

SEQ_LEN = 32
EOS = 3


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ_LEN,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def _split_matches_whole(out: str) -> None:
    """On each rank: the unsplit loss and gradients of one batch (packed documents included),
    then the same batch split by Ulysses; the group's loss and summed gradients must match."""
    from zeroforge.data.boundaries import DocumentBoundaries
    from zeroforge.trainer import distributed
    from zeroforge.trainer.engine import causal_lm_loss
    from zeroforge.trainer.sequence_parallel import sequence_parallel
    from zeroforge.trainer.topology import Topology

    info = distributed.init_distributed("cpu")
    model = _tiny_llama()
    # As build_engine trains it: without a cache, transformers keeps packed documents apart.
    model.config.use_cache = False
    tokens = torch.randint(4, 64, (2, SEQ_LEN + 1), generator=torch.Generator().manual_seed(1))
    tokens[:, [5, 20, 21]] = EOS  # documents of several lengths, one of them empty
    cases = {"plain": None, "documents": DocumentBoundaries(EOS, reset_position_ids=True, mask_cross_document_loss=True)}

    def loss_and_grads(boundaries, sequence=None):
        model.zero_grad()
        loss = causal_lm_loss(model, tokens, boundaries, sequence)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        if sequence is None:
            return loss.detach(), grads
        for grad in grads.values():  # what DeepSpeed's reduction does with one data-parallel rank
            torch.distributed.all_reduce(grad)
        return sequence.group_sum(loss), grads

    whole = {name: loss_and_grads(b) for name, b in cases.items()}  # before Ulysses takes over sdpa

    seen: list[tuple[int, ...]] = []
    model.get_input_embeddings().register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape)))
    topology = Topology(
        world_size=2,
        sequence=2,
        tensor=1,
        expert=1,
        micro_batch_size=2,
        global_batch_size=2,
        seq_len=SEQ_LEN,
        device="cpu",
        precision="fp32",
    )
    sequence = sequence_parallel(model, topology, stage=1)
    assert sequence is not None and sequence.rank == info.rank and sequence.size == 2
    for name, boundaries in cases.items():
        loss, grads = loss_and_grads(boundaries, sequence)
        torch.testing.assert_close(loss, whole[name][0], rtol=1e-5, atol=0, msg=name)
        for param, grad in grads.items():
            torch.testing.assert_close(grad, whole[name][1][param], rtol=1e-4, atol=1e-6, msg=f"{name}: {param}")
    assert seen == [(2, SEQ_LEN // 2)] * len(cases), seen  # each rank ran half of every sequence

    model.eval()  # evaluation and generation run whole sequences on every rank
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_loss(model, tokens), whole["plain"][0], rtol=1e-5, atol=0)
    Path(out, f"rank{info.rank}").touch()
    distributed.close()


def test_each_rank_computes_half_of_every_sequence_and_the_group_gets_the_unsplit_loss_and_gradients(tmp_path: Path) -> None:
    run_distributed(_split_matches_whole, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0", "rank1"]


PACKED = ["data.reset_position_ids=true", "data.mask_cross_document_loss=true"]


@pytest.fixture(scope="module")
def packed_reference(data_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process on packed documents (positions restarting per document, no loss across them)."""
    run_dir = tmp_path_factory.mktemp("packed") / "run"
    result = run_module("zeroforge.trainer.train", [*exact_overrides(data_cache, run_dir, 0), *PACKED], cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_sequence_parallel_training_on_packed_documents_matches_one_process(
    packed_reference: Path, two_rank_run: Callable[..., tuple[Path, str]]
) -> None:
    """ZeRO-2 and the chunked loss: 2 ranks that split every sequence give one process's losses."""
    run_dir, stdout = two_rank_run(2, "parallel.sequence=2", *PACKED)
    assert "world size 2 (sequence parallel 2, expert parallel 1)" in stdout and "dp 1 " in stdout and "loss chunked" in stdout
    expected, found = train_losses(packed_reference), train_losses(run_dir)
    assert len(found) == len(expected) == 20
    torch.testing.assert_close(torch.tensor(found), torch.tensor(expected), rtol=1e-5, atol=0)


@pytest.mark.slow
def test_a_zero3_sequence_parallel_run_resumes_without_it_on_another_world_size(
    packed_reference: Path, data_cache: Path, tmp_path: Path
) -> None:
    """10 steps of packed documents on 2 ranks splitting every sequence (ZeRO-3, where DeepSpeed's
    reduce-scatter needs the backward scale), then the rest on one process through the universal
    checkpoint (converted by `zeroforge universal`): every loss is one process's."""
    run_dir = tmp_path / "run"
    args = [*exact_overrides(data_cache, run_dir, 3), *PACKED]
    first = run_module(
        "zeroforge.trainer.train",
        [*args, "parallel.sequence=2", "train.exit_interval=10"],
        cwd=REPO,
        launcher=TORCHRUN,
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "(sequence parallel 2, expert parallel 1)" in first.stdout
    # A rank started by hand loads the universal form that `zeroforge universal` converts for it.
    converted = run_module("zeroforge.launcher.universal", args, cwd=REPO)
    assert converted.returncode == 0, converted.stdout[-3000:] + converted.stderr[-3000:]
    assert converted.stdout.splitlines()[-1] == str(run_dir / "checkpoints" / "step_0000010" / "universal")
    then = run_module("zeroforge.trainer.train", args, cwd=REPO)
    assert then.returncode == 0, then.stdout[-3000:] + then.stderr[-3000:]
    assert "through DeepSpeed's universal checkpoint" in then.stdout + then.stderr and "(step 10)" in then.stdout + then.stderr

    expected, found = train_losses(packed_reference), train_losses(run_dir)
    assert len(found) == len(expected) == 20
    torch.testing.assert_close(torch.tensor(found), torch.tensor(expected), rtol=1e-5, atol=0)
