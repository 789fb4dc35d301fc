"""The pre-flight plan: its figures against DeepSpeed's estimators and against what a real engine
and model hold on the CPU, its refusals, and its wiring into the launch path."""

from __future__ import annotations

import gc
import json
import re
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.zero import stage3, stage_1_and_2

from tests.conftest import REPO, engine_for, run_module
from zeroforge.launcher.estimate import Planner
from zeroforge.launcher.memory import GIB, activation_bytes, conversion_budget
from zeroforge.launcher.model_shape import model_shape
from zeroforge.launcher.plan import check_fits, format_plan
from zeroforge.trainer.config import ConfigError, compose_config
from zeroforge.trainer.engine import causal_lm_loss
from zeroforge.trainer.loss import install_loss
from zeroforge.trainer.model import build_model
from zeroforge.trainer.universal import conversion_peak, model_sizes, plan_conversion
from zeroforge.trainer.validate import job_topology

# A model a few times the tiny one, so that DeepSpeed's printed GB figures have digits to compare.
SMALL = ["model.hidden_size=512", "model.num_heads=8", "model.num_kv_heads=8", "model.intermediate_size=1536"]
H100 = [
    "cluster=h100",
    "cluster.gpu_memory_gb=80",
    "model.vocab_size=128256",
    "data.seq_len=8192",
    "train.micro_batch_size=1",
    "train.global_batch_size=512",
]


def _plan(overrides: list[str]):
    cfg = compose_config(overrides)
    return cfg, Planner.of(cfg, job_topology(cfg)).estimate()


def _hardware(nodes: int, gpus: int, stage: int, offload: str) -> list[str]:
    offloads = {
        "none": [],
        "optimizer": ["deepspeed.offload_optimizer=true"],
        "both": ["deepspeed.offload_optimizer=true", "deepspeed.offload_params=true"],
    }
    return [
        "model.vocab_size=4096",
        "train.precision=bf16",
        f"cluster.nodes={nodes}",
        f"cluster.nproc_per_node={gpus}",
        f"deepspeed.stage={stage}",
        f"train.global_batch_size={64 * nodes * gpus}",
        *offloads[offload],
    ]


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(compose_config().model, 4096)


# DeepSpeed's estimators count, per GPU: ZeRO-2 2N + 18N/D (16-bit weights; 16-bit and fp32
# gradients, fp32 master, Adam m and v sharded), 2N with the optimizer offloaded; ZeRO-3
# 4 x largest layer + 18N/D, + 2N/D offloading only the optimizer, nothing more offloading both.
# Their ZeRO-3 figure leaves out the 16-bit gradient partition DeepSpeed keeps (grad_partitions_flat_buffer),
# so that is taken out of ours before comparing the same quantity.
@pytest.mark.parametrize("nodes,gpus", [(1, 1), (1, 8), (4, 8)])
@pytest.mark.parametrize("stage,offload", [(2, "none"), (2, "optimizer"), (3, "none"), (3, "optimizer"), (3, "both")])
def test_model_states_within_5_percent_of_deepspeed_estimators(
    tiny_model: torch.nn.Module, nodes: int, gpus: int, stage: int, offload: str
) -> None:
    _, plan = _plan(_hardware(nodes, gpus, stage, offload))
    ours = plan.states.total
    if stage == 2:
        params = stage_1_and_2.model_to_params(tiny_model)
        _, theirs = stage_1_and_2.estimate_zero2_model_states_mem_needs(
            params, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=offload == "optimizer"
        )
    else:
        params, largest = stage3.model_to_params(tiny_model)
        assert largest == plan.model.largest_layer
        _, theirs, _ = stage3.estimate_zero3_model_states_mem_needs(
            params,
            largest,
            num_gpus_per_node=gpus,
            num_nodes=nodes,
            cpu_offload=offload != "none",
            cpu_offload_params=offload == "both",
        )
        if offload == "none":
            ours -= 2 * params / (nodes * gpus)
    assert params == plan.model.params
    assert ours == pytest.approx(theirs, rel=0.05)


@pytest.mark.parametrize("stage", [2, 3])
def test_the_printed_all_live_estimate_agrees(stage: int, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    model = build_model(compose_config(SMALL).model, 4096)
    capsys.readouterr()
    if stage == 2:
        stage_1_and_2.estimate_zero2_model_states_mem_needs_all_live(model, num_gpus_per_node=1)
        row = r"\|\s+([\d.]+)GB \| offload_optimizer=none"
    else:
        stage3.estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=1)
        row = r"\|\s+([\d.]+)GB \| offload_param=none, offload_optimizer=none, zero_init=1"
    theirs = float(re.search(row, capsys.readouterr().out).group(1))
    _, plan = _plan([*SMALL, *_hardware(1, 1, stage, "none")])
    ours = plan.states.total - (2 * plan.model.params if stage == 3 else 0)
    # Their figure is printed to 0.01 GiB.
    assert ours / GIB == pytest.approx(theirs, rel=0.05, abs=0.005)


def test_llama_70b_with_zero1_on_one_h100_node_is_refused_with_fixes_that_fit() -> None:
    overrides = [*H100, "model=llama-70b", "deepspeed=zero1"]
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError) as refused:
        check_fits(Planner.of(cfg, job_topology(cfg)))
    message = str(refused.value)
    assert "llama-70b needs" in message and "cluster.gpu_memory_gb=80" in message
    assert "Changes that fit" in message and "launcher.force=true" in message
    fixes = re.findall(r"^  (\S.*?)  ->  ", message, flags=re.M)
    assert fixes and any("deepspeed.stage=3" in fix for fix in fixes)
    for fix in fixes:  # each suggestion, applied as the user would, fits
        cfg, plan = _plan([*overrides, *fix.split()])
        assert plan.fits, fix


def test_one_machine_is_never_told_to_add_nodes() -> None:
    cfg = compose_config(["model=llama-70b", "deepspeed=zero1", "cluster.nproc_per_node=8", *H100[1:]])
    with pytest.raises(ConfigError) as refused:
        check_fits(Planner.of(cfg, job_topology(cfg)))
    assert "(local)" in str(refused.value) and "cluster.nodes" not in str(refused.value)
    assert "deepspeed.offload_optimizer=true" in str(refused.value)


def test_force_launches_what_does_not_fit_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    cfg = compose_config([*H100, "model=llama-70b", "deepspeed=zero1", "launcher.force=true"])
    with caplog.at_level("WARNING", logger="zeroforge"):
        plan = check_fits(Planner.of(cfg, job_topology(cfg)))
    assert plan.fits is False
    assert "launcher.force=true: launching although llama-70b needs" in caplog.text


def test_unknown_gpu_memory_never_refuses() -> None:
    cfg = compose_config(["model=llama-70b", "model.vocab_size=128256", "deepspeed=zero0"])
    assert cfg.cluster.gpu_memory_gb is None
    assert check_fits(Planner.of(cfg, job_topology(cfg))).fits is None


@pytest.mark.parametrize("model,params_b", [("llama-1b", 1.236), ("llama-8b", 8.030), ("llama-70b", 70.554)])
def test_plans_compose_across_nodes_and_stages(model: str, params_b: float) -> None:
    by_stage = {}
    for nodes in (1, 2, 8):
        totals = []
        for stage in range(4):
            _, plan = _plan([*H100, f"model={model}", f"deepspeed.stage={stage}", f"cluster.nodes={nodes}"])
            assert plan.model.params / 1e9 == pytest.approx(params_b, abs=5e-4)
            assert plan.model.flops_per_token > 6 * plan.model.params * 0.9
            assert plan.activations_other < plan.activations  # checkpointing saves memory
            totals.append(plan.states.total)
            by_stage[stage, nodes] = plan
        assert totals == sorted(totals, reverse=True), f"{model} at {nodes} nodes: higher stages must not need more"
    for stage in (1, 2, 3):  # sharded states shrink with more ranks; time per step too
        assert by_stage[stage, 8].states.total < by_stage[stage, 1].states.total
        assert by_stage[stage, 8].step_time_s == pytest.approx(by_stage[stage, 1].step_time_s / 8)
    if model == "llama-70b":
        assert not any(plan.fits for (stage, _), plan in by_stage.items() if stage < 3)


def test_step_time_follows_flops_and_assumed_mfu() -> None:
    _, plan = _plan([*H100, "model=llama-8b", "deepspeed.stage=3", "launcher.assumed_mfu=0.5", "train.steps=100"])
    expected = plan.model.flops_per_token * 512 * 8192 / (8 * 989e12 * 0.5)
    assert plan.step_time_s == pytest.approx(expected)
    assert plan.total_time_s == pytest.approx(100 * expected)
    # Inference: bf16 weights plus K and V of every layer at the context.
    assert plan.kv_cache == 2 * 32 * 1024 * 2 * 1 * 8192


def _storages() -> dict[int, int]:
    found = {}
    with warnings.catch_warnings():  # isinstance() on deprecated module attributes warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor) and obj.device.type == "cpu"]
    for tensor in tensors:
        storage = tensor.untyped_storage()
        found[storage.data_ptr()] = storage.nbytes()
    return found


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_engine_states_after_a_step_match_the_estimate(stage: int, tmp_path: Path, process_group: None) -> None:
    """A real DeepSpeed engine trains one step on the CPU (fp32, one rank); every tensor that is
    alive afterwards is weighed. Gradients, their fp32 copies and activations are freed by then,
    so the estimate's persistent part is compared: weights and optimizer states, and under ZeRO-3
    its gradient partition and reduction bucket. Tolerance 3% (small tensors: RoPE tables, the batch)."""
    from zeroforge.trainer.validate import validate

    bucket = 200_000
    cfg = compose_config(
        [
            "model.vocab_size=4096",
            "train.precision=fp32",
            f"deepspeed.stage={stage}",
            "train.micro_batch_size=2",
            "train.global_batch_size=2",
            "data.seq_len=64",
            f"+deepspeed.zero_extra.reduce_bucket_size={bucket}",
            f"run.dir={tmp_path}",
        ]
    )
    plan = Planner.of(cfg, job_topology(cfg)).estimate()
    gc.collect()  # the engines of earlier stages must be gone, or their addresses come back as new
    before = _storages()
    torch.manual_seed(0)
    engine = engine_for(build_model(cfg.model, 4096), cfg, validate(cfg, 1, cuda=False))
    engine.backward(causal_lm_loss(engine, torch.randint(0, 4096, (2, 65))))
    engine.step()
    measured = sum(n for ptr, n in _storages().items() if ptr not in before)
    engine.destroy()
    s, gathered = plan.states, 4 * plan.model.largest_layer if stage == 3 else 0
    expected = s.weights - gathered + s.master + s.moments
    if stage == 3:
        expected += s.gradients - gathered + 4 * bucket
    assert measured == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize(
    "attn,checkpointing,loss",
    [
        ("sdpa", False, "plain"),
        ("sdpa", True, "plain"),
        ("eager", False, "plain"),
        ("sdpa", False, "chunked"),
        ("sdpa", True, "chunked"),
    ],
)
def test_saved_activations_match_the_estimate(attn: str, checkpointing: bool, loss: str) -> None:
    """Every tensor autograd saves for the backward of the real model (fp32, CPU), weighed by a
    saved-tensors hook, against the estimate; within 5%. The chunked loss runs as the trainer
    wires it (trainer/loss.py), at 4 chunks of 128 tokens."""
    cfg = compose_config(
        ["model.vocab_size=4096", f"model.attn_implementation={attn}", f"train.loss={loss}", "train.loss_chunk_tokens=128"]
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, 4096)
    model.config.use_cache = False
    install_loss(model, loss, cfg.train.loss_chunk_tokens)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    micro, seq = 2, 256
    tokens = torch.randint(0, 4096, (micro, seq + 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss(model, tokens)
    expected = activation_bytes(
        model_shape(cfg.model, cfg.data),
        micro,
        seq,
        4,
        checkpointing,
        eager=attn == "eager",
        loss=loss,
        chunk_tokens=cfg.train.loss_chunk_tokens,
    ).saved
    assert sum(saved.values()) == pytest.approx(expected, rel=0.05)


def test_plan_cli_prints_the_table() -> None:
    result = run_module(
        "zeroforge.launcher.plan",
        [*H100, "model=llama-8b", "deepspeed=zero3", "model.activation_checkpointing=true"],
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "llama-8b: 8.030B parameters" in out and "verdict: fits in 80.0 GiB" in out
    assert "| 3 + offload (zero3-offload) |" in out and "inference: weights 15.0 GiB" in out


def test_launch_refuses_before_preparing_data(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    result = run_module(
        "zeroforge.launcher",
        [
            "model=llama-1b",
            "cluster.gpu_memory_gb=8",
            "data.seq_len=2048",
            f"data.cache_dir={cache}",
            f"run.dir={tmp_path / 'run'}",
            "logging.wandb.mode=disabled",
        ],
        cwd=REPO,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    assert "zeroforge: configuration error: llama-1b needs" in output and "Traceback" not in output
    assert not cache.exists(), "the data was prepared before the plan refused the job"


EIGHT_B_8192 = [
    "cluster=h100",
    "model=llama-8b",
    "deepspeed=zero3",
    "model.vocab_size=128256",
    "data.seq_len=8192",
    "train.global_batch_size=512",
]


def test_the_chunked_loss_fits_llama_8b_at_8192_tokens_where_the_plain_loss_does_not() -> None:
    """8 x 80 GiB, ZeRO-3: with activation checkpointing, micro batch 2 fits with either loss, micro
    batch 4 only with the chunked one (the plain loss's fp32 logits of 32,768 tokens are 16 GiB,
    and their gradient as much again); without checkpointing neither fits micro batch 2."""

    def plan(loss: str, micro: int, ckpt: bool):
        return _plan(
            [*EIGHT_B_8192, f"train.loss={loss}", f"train.micro_batch_size={micro}", f"model.activation_checkpointing={str(ckpt).lower()}"]
        )[1]

    assert plan("plain", 2, True).fits and plan("chunked", 2, True).fits
    assert not plan("plain", 4, True).fits and plan("chunked", 4, True).fits
    assert not plan("plain", 2, False).fits and not plan("chunked", 2, False).fits
    # Most of the fp32 logits and their gradient (31.3 GiB) are saved: the chunked loss holds one
    # chunk's logits, and the output layer's gradient with its fp32 sum, instead.
    logits_and_gradient = 2 * 32768 * 128256 * 4
    saved = plan("plain", 4, True).activations - plan("chunked", 4, True).activations
    assert 0.8 * logits_and_gradient < saved < logits_and_gradient


def test_a_plain_loss_that_does_not_fit_is_told_the_chunked_one_first() -> None:
    cfg = compose_config([*EIGHT_B_8192, "train.loss=plain", "train.micro_batch_size=4", "model.activation_checkpointing=true"])
    with pytest.raises(ConfigError) as refused:
        check_fits(Planner.of(cfg, job_topology(cfg)))
    first = re.findall(r"^  (\S.*?)  ->  ", str(refused.value), flags=re.M)[0]
    assert first == "train.loss=chunked"
    assert "loss plain" in str(refused.value)


def test_best_micro_batch_is_the_largest_that_fits() -> None:

    cfg = compose_config([*EIGHT_B_8192, "model.activation_checkpointing=true"])
    micro, plan = Planner.of(cfg, job_topology(cfg)).best_micro_batch(limit=64)
    assert plan.fits and plan.setup.micro_batch == micro
    bigger = compose_config([*EIGHT_B_8192, "model.activation_checkpointing=true", f"train.micro_batch_size={2 * micro}"])
    assert not Planner.of(bigger, job_topology(bigger)).estimate().fits


LLAMA_70B_8_NODES = [
    "model=llama-70b",
    "deepspeed=zero3",
    "cluster=h100",
    "cluster.nodes=8",
    "model.activation_checkpointing=true",
    *H100[2:],
]


def test_plan_cli_prints_host_memory_per_node_and_refuses_too_little() -> None:
    fits = run_module("zeroforge.launcher.plan", LLAMA_70B_8_NODES, cwd=REPO, timeout=120)
    assert fits.returncode == 0, fits.stderr[-2000:]
    assert "verdict: fits in 80.0 GiB" in fits.stdout and "host verdict: fits in 2048.0 GiB per node" in fits.stdout
    rows = re.findall(r"^\| (start-up|resume|save|export): .*\| ([\d.]+) GiB \| ([\d.]+) GiB \|$", fits.stdout, flags=re.M)
    assert [r[0] for r in rows] == ["start-up", "resume", "save", "export"]
    assert all(0 < float(per_node) < 2048 for _, _, per_node in rows)

    # Its checkpoints, converted to resume on another world size: 788 GiB of optimizer state, one
    # rank's 64th at a time per extract worker, DeepSpeed's default workers within 2 TB.
    assert re.search(
        r"^resume on another world size: this job's checkpoints \(64 ranks\) are converted to DeepSpeed's universal checkpoint "
        r"before the ranks start, peak host memory 83.9 GiB with 4 extract \+ 2 merge workers, about 40 min \(time limit 2.7 h\)$",
        fits.stdout,
        flags=re.M,
    ), fits.stdout[-3000:]

    small = run_module("zeroforge.launcher.plan", [*LLAMA_70B_8_NODES, "cluster.host_memory_gb=64"], cwd=REPO, timeout=120)
    assert small.returncode == 0, small.stderr[-2000:]
    assert "host verdict: DOES NOT FIT in 64.0 GiB per node" in small.stdout
    assert "of host memory per node (at resume) but cluster.host_memory_gb=64.0 (h100)" in small.stdout


def test_host_memory_refusal_names_the_numbers_and_fixes_that_fit() -> None:
    cfg = compose_config([*LLAMA_70B_8_NODES, "cluster.host_memory_gb=64"])
    assert Planner.of(cfg, job_topology(cfg)).estimate().gpu_fits is True
    with pytest.raises(ConfigError) as refused:
        check_fits(Planner.of(cfg, job_topology(cfg)))
    message = str(refused.value)
    assert "per GPU but" not in message  # the GPUs are not the problem
    needs = float(re.search(r"needs ([\d.]+) GiB of host memory per node", message).group(1))
    assert needs > 64 and "resume 12.3 GiB" in message and "x 8 ranks a node" in message
    fixes = re.findall(r"^  (\S.*?)  ->  ", message, flags=re.M)
    assert fixes
    for fix in fixes:
        cfg, plan = _plan([*LLAMA_70B_8_NODES, "cluster.host_memory_gb=64", *fix.split()])
        assert plan.fits and plan.host.per_node <= 64 * GIB, fix


def test_whole_model_builds_are_counted_on_the_host_and_partitioned_ones_are_not() -> None:
    """Without partitioned construction every rank first builds the whole model in fp32 on the CPU:
    llama-8b at 8 ranks a node is 8 x 32 GB, more than a 256 GB node has, even where the GPUs fit."""
    base = ["model=llama-8b", "cluster=h100", "cluster.host_memory_gb=256", *H100[2:], "model.activation_checkpointing=true"]
    _, whole = _plan([*base, "deepspeed=zero3", "deepspeed.zero_init=false"])
    _, partitioned = _plan([*base, "deepspeed=zero3"])
    n = whole.model.params
    assert whole.host.startup == 4 * n and partitioned.host.startup == 2 * n / 8
    assert whole.gpu_fits and whole.host_fits is False and whole.host.highest == "start-up"
    assert partitioned.fits
    with pytest.raises(ConfigError, match=r"host memory per node \(at start-up\)[\s\S]*deepspeed.zero_init=true"):
        whole_cfg = compose_config([*base, "deepspeed=zero3", "deepspeed.zero_init=false"])
        check_fits(Planner.of(whole_cfg, job_topology(whole_cfg)))


def test_the_async_save_copy_is_counted() -> None:
    """The async save copies the rank's checkpoint to the host, as much as a resume reads back."""
    _, sync = _plan(LLAMA_70B_8_NODES)
    _, asynchronous = _plan([*LLAMA_70B_8_NODES, "checkpoint.async_save=true"])
    n, ranks = sync.model.params, 64
    assert asynchronous.host.save == pytest.approx(12 * n / ranks) == asynchronous.host.resume  # fp32 master, Adam m and v
    assert sync.host.save == pytest.approx(4 * min(n / ranks, 1e9))  # one fp32 sub-group staged by torch.save
    assert asynchronous.host.phases()["save"] > sync.host.phases()["save"]


LONG_CONTEXT = [
    *H100,
    "model=llama-8b",
    "deepspeed=zero3",
    "model.activation_checkpointing=true",
    "data.seq_len=131072",
    "model.max_position_embeddings=131072",
    "train.global_batch_size=8",
]


def test_sequence_parallelism_divides_activations_and_is_offered_for_long_context() -> None:
    cfg = compose_config(LONG_CONTEXT)
    planner = Planner.of(cfg, job_topology(cfg))
    whole = planner.estimate()
    assert whole.gpu_fits is False
    split = planner.plan(replace(whole.setup, sequence=8))
    # The same ZeRO shards (all 8 ranks), an eighth of the tokens' activations per rank.
    assert split.states.total == whole.states.total
    assert split.activations < whole.activations / 6 and split.gpu_fits
    assert planner.longest_seq_len() == 65536
    with pytest.raises(ConfigError) as refused:
        check_fits(planner)
    fixes = re.findall(r"^  (\S.*?)  ->  ", str(refused.value), flags=re.M)
    assert fixes[0] == "parallel.sequence=2"
    for fix in fixes:  # each suggestion, applied as the user would, validates and fits
        _, plan = _plan([*LONG_CONTEXT, *fix.split()])
        assert plan.fits, fix
    eight = compose_config([*LONG_CONTEXT, "parallel.sequence=8"])
    planner = Planner.of(eight, job_topology(eight))
    text = format_plan(planner, planner.estimate())
    assert "8 GPUs, sequence parallel 8," in text and "longest data.seq_len that fits this setup: 131,072" in text


def test_a_head_count_the_degree_does_not_divide_is_never_offered() -> None:
    # 6 heads: parallel.sequence=4 or 8 cannot split them, so no fix offers it.
    cfg = compose_config([*LONG_CONTEXT, "model.num_heads=6", "model.num_kv_heads=6", "model.hidden_size=3072"])
    assert Planner.of(cfg, job_topology(cfg)).sequence_splits(1) == [1, 2]


def test_the_universal_conversion_holds_one_shard_a_worker_and_as_many_workers_as_fit() -> None:
    """llama-70b's optimizer state is 788 GiB (12 bytes a parameter), but ds_to_universal never holds
    it all: each extract worker loads one rank's file, each merge worker one parameter's fragments."""
    params, embedding = 70_553_706_496, 1_050_673_152  # llama-70b at vocabulary 128256 (model_shape)
    one_node = model_sizes(params, embedding, world_size=8, stage=3, element_bytes=2)
    assert one_node.optimizer / GIB == pytest.approx(788.5, abs=0.1) and one_node.shard == one_node.optimizer / 8
    node = conversion_budget(2048)
    plan = plan_conversion(one_node, node, 0.5)
    assert (plan.extract_workers, plan.merge_workers) == (4, 2) and plan.fits  # DeepSpeed's defaults fit 2 TB
    # Extracting is the peak: 4 workers, each a 98.6 GiB shard with one of its three states copied
    # again and one fp32 fragment of the embedding, 0.5 GiB a process (and the main one).
    shard, embedding_fp32 = one_node.shard / GIB, 4 * embedding / GIB
    assert plan.peak / GIB == pytest.approx(5 * 0.5 + 4 * (shard * 4 / 3 + embedding_fp32))
    assert conversion_peak(one_node, 1, 1) < conversion_peak(one_node, 2, 1) < plan.peak
    # A node of 512 GiB: fewer workers, so that it fits; unknown memory: one of each, the least.
    assert plan_conversion(one_node, conversion_budget(512), 0.5).extract_workers == 3
    assert plan_conversion(one_node, None, 0.5).extract_workers == 1 and plan_conversion(one_node, None, 0.5).fits is None
    # Saved by one rank, its one file is the whole 788 GiB: one extract worker, which needs more
    # than a 1 TB node has, and fits a 2 TB one.
    alone = model_sizes(params, embedding, world_size=1, stage=3, element_bytes=2)
    assert plan_conversion(alone, node, 0.5).extract_workers == 1 and plan_conversion(alone, node, 0.5).fits
    assert plan_conversion(alone, conversion_budget(1024), 0.5).fits is False
    assert plan.timeout_s(None) == 4 * plan.seconds and plan.timeout_s(7200) == 7200
    assert plan_conversion(one_node, node, 1.0).seconds == pytest.approx(plan.seconds / 2)  # cluster.storage_gb_s
    assert plan_conversion(model_sizes(10**6, 10**5, 2, 2, 4), None, 0.5).timeout_s(None) == 600  # the least


def test_a_resume_on_another_world_size_counts_its_conversion_against_host_memory(tmp_path: Path) -> None:
    """The plan reads a checkpoint's own files: which world size saved it (its manifest), its
    optimizer-state files' sizes, and its largest parameter (the model states' shapes)."""
    checkpoint = tmp_path / "step_0000010"
    checkpoint.mkdir()
    (checkpoint / "manifest.json").write_text(json.dumps({"step": 10, "run": {"world_size": 2}, "files": {}}))
    torch.save({"param_shapes": [{"w": torch.Size([1000, 1000])}]}, checkpoint / "mp_rank_00_model_states.pt")
    for rank in range(2):
        with open(checkpoint / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", "wb") as f:
            f.truncate(60 * GIB)  # sparse: its size, without the disk
    base = [f"checkpoint.resume={checkpoint}", "cluster.host_memory_gb=256"]
    cfg, plan = _plan(base)
    conversion = plan.conversion
    assert conversion.checkpoint == checkpoint and conversion.saved_by == 2 and plan.world_size == 1
    assert conversion.plan.sizes.largest_param == 10**6 and conversion.plan.sizes.shard == 60 * GIB
    assert (conversion.plan.extract_workers, conversion.plan.merge_workers) == (2, 2) and plan.fits
    planner = Planner.of(cfg, job_topology(cfg))
    assert f"resume on another world size: {checkpoint} (saved by 2 ranks, this job has 1) is converted" in format_plan(planner, plan)

    _, small = _plan([*base, "cluster.host_memory_gb=64"])
    assert small.host_fits and small.conversion_fits is False and small.fits is False
    cfg = compose_config([*base, "cluster.host_memory_gb=64"])
    with pytest.raises(ConfigError) as refused:
        check_fits(Planner.of(cfg, job_topology(cfg)))
    message = str(refused.value)
    assert f"cannot resume from {checkpoint} on another world size: converting it" in message
    assert "needs 80.5 GiB of host memory even with 1 extract and 1 merge worker" in message
    assert (
        "one rank's optimizer state (the largest file) 60.0 GiB" in message
        and "Resume on the world size that saved it (2 ranks)" in message
    )
    assert "No change of" not in message  # nothing in the training setup makes a conversion smaller

    (checkpoint / "universal").mkdir()  # converted: nothing left to plan for it
    _, converted = _plan([*base, "cluster.host_memory_gb=64"])
    assert converted.conversion.checkpoint is None and converted.fits


def test_fp8_adds_one_layers_float8_casts_where_they_exceed_the_loss_chunk() -> None:
    base = [*H100, "model=llama-8b", "deepspeed=zero3", "train.global_batch_size=64", "model.activation_checkpointing=true"]
    for micro, larger in ((1, False), (8, True)):
        bf16, fp8 = (_plan([*base, f"train.precision={p}", f"train.micro_batch_size={micro}"])[1] for p in ("bf16", "fp8"))
        assert fp8.topology.precision == "fp8" and fp8.states.total == bf16.states.total  # bf16 states
        # The casts of one linear layer at a time: one byte per weight and per token of its input
        # and output, transient like the loss's chunk, so the peak takes the larger.
        h, i, tokens = 4096, 14336, micro * fp8.topology.seq_len
        casts = 2 * h * i + tokens * (2 * i + h)
        assert (fp8.activations > bf16.activations) is larger, micro
        if larger:
            chunk = 1024 * fp8.model.vocab_size * 8  # the chunked loss's fp32 logits and their bf16 copy and gradient
            assert fp8.activations - bf16.activations == casts - chunk


def test_a_hang_timeout_shorter_than_a_save_is_refused_and_a_null_one_is_sized_from_the_plan() -> None:
    seventy = [
        *H100,
        "model=llama-70b",
        "deepspeed=zero3",
        "model.activation_checkpointing=true",
        "cluster.nodes=8",
        "train.global_batch_size=64",
    ]
    _, plan = _plan(seventy)
    # Rank 0 writes its optimizer partition (12 bytes a parameter over 64 ranks) and its bf16 shard.
    n = plan.model.params
    assert plan.save_time_s == pytest.approx((12 * n / 64 + 2 * n / 64) / (0.5 * 2**30))
    assert plan.hang_timeout_s == max(600, round(10 * plan.step_time_s), round(3 * plan.save_time_s))
    short = compose_config([*seventy, "cluster.hang_timeout_s=20"])
    with pytest.raises(
        ConfigError, match=r"cluster.hang_timeout_s=20 is shorter than the time a checkpoint save of this job takes by the plan \((\d+) s"
    ):
        check_fits(Planner.of(short, job_topology(short)))
    long = compose_config([*seventy, "cluster.hang_timeout_s=3600"])
    assert check_fits(Planner.of(long, job_topology(long))).hang_timeout_s == 3600


def test_a_mixture_of_experts_is_planned_on_its_active_flops_and_its_experts_per_rank() -> None:
    """Qwen3-30B-A3B, as Qwen publishes it: 30.5B parameters, 3.3B activated per token. Its FLOPs
    count the active ones; with parallel.expert=8 each rank holds an eighth of the routed experts."""
    common = [*H100[:3], "model=qwen3-30b-a3b", "model.vocab_size=151936", "data.seq_len=4096", "cluster.nodes=2", "deepspeed=zero2"]
    _, replicated = _plan([*common, "train.micro_batch_size=1", "train.global_batch_size=64"])
    cfg, sharded = _plan([*common, "train.micro_batch_size=1", "train.global_batch_size=64", "parallel.expert=8"])
    m = sharded.model
    assert m.params == pytest.approx(30.5e9, rel=0.01) and m.active_params == pytest.approx(3.3e9, rel=0.02)
    assert m.experts == 128 and m.expert_params == pytest.approx(29.0e9, rel=0.01)
    assert m.flops_per_token == pytest.approx(6 * (m.active_params - 151936 * 2048) + 12 * 48 * 2048 * 4096)
    # bf16 weights: the dense part whole, the routed experts an eighth on each rank.
    assert sharded.weights == pytest.approx(2 * (m.params - m.expert_params + m.expert_params / 8))
    assert replicated.weights == pytest.approx(2 * m.params)
    # ZeRO shards the experts' optimizer states over the ranks that hold each expert: 16 / 8 ranks
    # share each eighth, so a rank's share is the same as without expert parallelism.
    assert sharded.optimizer == pytest.approx(replicated.optimizer)
    planner = Planner.of(cfg, job_topology(cfg))
    assert "mixture of experts: 128 experts per MoE layer, 16 on each rank (parallel.expert=8)" in format_plan(planner, sharded)
    assert planner.sequence_splits(2) == [1]  # never offered: a MoE's routing is balanced over whole sequences
