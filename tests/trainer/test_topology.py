"""The topology: derived once from the config and the world size, for the machines that run the job."""

from __future__ import annotations

import pytest

from zeroforge.trainer.config import ConfigError, compose_config
from zeroforge.trainer.topology import job_is_on_gpus, job_world_size, resolve_precision
from zeroforge.trainer.validate import job_topology, validate


def test_the_topology_splits_the_global_batch_over_the_data_parallel_ranks() -> None:
    cfg = compose_config(["train.micro_batch_size=2", "train.global_batch_size=16", "data.seq_len=64"])
    topology = validate(cfg, 4, cuda=False)
    assert (topology.world_size, topology.dp_size, topology.grad_accum) == (4, 4, 2)
    assert topology.tokens_per_step == 16 * 64
    assert (topology.device, topology.precision) == ("cpu", "fp32")


def test_tensor_parallelism_is_refused_until_it_lands() -> None:
    cfg = compose_config(["parallel.tensor=2", "train.micro_batch_size=1", "train.global_batch_size=8"])
    with pytest.raises(ConfigError, match=r"parallel\.tensor=2: .* is not available yet; expected 1"):
        validate(cfg, 4, cuda=False)


def test_sequence_parallel_groups_are_consecutive_ranks_that_share_their_samples() -> None:
    cfg = compose_config(["parallel.sequence=2", "train.micro_batch_size=2", "train.global_batch_size=8", "data.seq_len=64"])
    topology = validate(cfg, 4, cuda=False)
    assert (topology.dp_size, topology.grad_accum, topology.tokens_per_step) == (2, 2, 8 * 64)
    assert [topology.dp_rank(r) for r in range(4)] == [0, 0, 1, 1]
    assert [topology.sequence_rank(r) for r in range(4)] == [0, 1, 0, 1]
    # The global batch is checked against the data-parallel ranks, not all ranks.
    with pytest.raises(ConfigError, match=r"train.micro_batch_size \(2\) x data-parallel size \(2\) = 4"):
        validate(compose_config(["parallel.sequence=2", "train.micro_batch_size=2", "train.global_batch_size=6"]), 4, cuda=False)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.seq_len=63"], r"data.seq_len=63 must be divisible by parallel.sequence=2"),
        (
            ["model.num_heads=3", "model.num_kv_heads=3", "model.hidden_size=96"],
            r"model.num_heads=3 must be divisible by parallel.sequence=2",
        ),
        (["model.attn_implementation=eager"], r"needs model.attn_implementation in \['flash_attention_2', .*found 'eager'"),
        (["deepspeed=zero3", "+deepspeed.zero_extra.reduce_scatter=false"], r"under ZeRO-3 needs DeepSpeed's reduce-scatter"),
        (["model.attn_implementation=flex_attention", "data.reset_position_ids=true"], r"flex_attention attends across packed documents"),
    ],
)
def test_what_ulysses_cannot_split_is_refused_with_the_numbers(overrides: list[str], expected: str) -> None:
    cfg = compose_config(["parallel.sequence=2", "train.micro_batch_size=1", "train.global_batch_size=8", *overrides])
    with pytest.raises(ConfigError, match=expected):
        validate(cfg, 2, cuda=False)


def test_the_parallel_degrees_must_divide_the_world_size() -> None:
    cfg = compose_config(["parallel.tensor=3", "train.micro_batch_size=1", "train.global_batch_size=8"])
    with pytest.raises(ConfigError, match=r"= 3 must divide the world size 2"):
        validate(cfg, 2, cuda=False)


def test_a_launch_asks_the_cluster_config_which_machines_run_the_job() -> None:
    # On this CPU machine: H100 nodes have GPUs, Slurm nodes without GPUs and this machine do not.
    h100 = compose_config(["cluster=h100", "train.micro_batch_size=2"])
    assert job_is_on_gpus(h100.cluster) and job_world_size(h100.cluster) == 8
    assert job_topology(h100).precision == "bf16"
    cpu_nodes = compose_config(["cluster=slurm", "cluster.nodes=2", "cluster.nproc_per_node=1", "cluster.gpus_per_node=0"])
    assert not job_is_on_gpus(cpu_nodes.cluster) and job_world_size(cpu_nodes.cluster) == 2
    assert not job_is_on_gpus(compose_config([]).cluster)


def test_precision_auto_is_bf16_on_gpus_and_fp32_on_the_cpu() -> None:
    assert resolve_precision("auto", cuda=True) == "bf16" and resolve_precision("auto", cuda=False) == "fp32"
    assert resolve_precision("fp32", cuda=True) == "fp32" and resolve_precision("bf16", cuda=False) == "bf16"
