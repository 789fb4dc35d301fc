"""Every mistake a user can make in the config, table by table: the real `zeroforge` command
refuses it before training with exit code 2, one paragraph naming the key, what was expected and
what was found, and no traceback.

The commands run in this process (`zeroforge.launcher.cli.main`, exactly what the console script
calls), so that the table stays fast; tests/launcher/test_user_errors.py runs some of the same
mistakes as separate processes, through torchrun too.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import pytest

from zeroforge.launcher.cli import main as zeroforge

# Two local ranks splitting every sequence.
SEQUENCE_2 = ["cluster.nproc_per_node=2", "parallel.sequence=2"]
# (command, overrides, texts the refusal must contain: the key, the expectation, what was found)
CONFIG_MISTAKES = [
    # model
    ("launch", ["model=nosuch"], ["model/nosuch", "llama-125m"]),
    ("launch", ["model.hidden_size=0"], ["model.hidden_size must be at least 1, found 0"]),
    ("launch", ["model.hidden_size=130"], ["model.hidden_size=130 must be divisible by model.num_heads=4"]),
    ("launch", ["model.num_kv_heads=3"], ["model.num_heads=4 must be divisible by model.num_kv_heads=3"]),
    (
        "launch",
        ["model.model_type=nosuch"],
        ["model.model_type='nosuch'", "not a causal LM config", "Unrecognized model identifier: nosuch"],
    ),
    ("launch", ["model.hidden_size=100"], ["model.hidden_size=100", "RoPE requires an even rotary dimension"]),
    ("launch", ["model.attn_implementation=fast"], ["model.attn_implementation must be one of", "'sdpa'", "found 'fast'"]),
    ("launch", ["model.max_position_embeddings=32"], ["data.seq_len=128 must be between 1 and", "model.max_position_embeddings=32"]),
    ("launch", ["model.vocab_size=256"], ["the tokenizer has 4096 tokens but model.vocab_size=256"]),
    ("launch", ["model.init_from=/no/such/model"], ["model.init_from=/no/such/model", "no causal LM config could be read there"]),
    (
        "launch",
        ["model.model_type=gpt2", "model.intermediate_size=9999", "model.num_kv_heads=1"],
        ["model.num_kv_heads=1 does not reach the gpt2 config: GPT2Config has no num_key_value_heads", "its 4 attention heads"],
    ),
    (
        "launch",
        ["model.model_type=bloom"],
        ["model.intermediate_size=384 does not reach the bloom config: BloomConfig has no intermediate_size"],
    ),
    # data
    ("launch", ["data=nosuch"], ["data/nosuch", "embedded"]),
    ("launch", ["data.seq_len=0"], ["data.seq_len must be at least 1, found 0"]),
    ("launch", ["data.validation_fraction=0"], ["data.validation_fraction must be above 0 and below 1, found 0.0"]),
    ("launch", ["data.mode=streamed"], ["data.mode must be one of ['prepared', 'stream'], found 'streamed'"]),
    ("launch", ["data.num_workers=-1"], ["data.num_workers must be at least 0, found -1"]),
    ("launch", ["data.prepare_workers=0"], ["data.prepare_workers must be at least 1, found 0"]),
    ("launch", ["data.tokenizer_vocab_size=100"], ["data.tokenizer_vocab_size must be at least 512, found 100"]),
    ("launch", ["data.mode=stream"], ["data.mode=stream", "found data.tokenizer='embedded'"]),
    ("launch", ["data.mixture=[{name: a, source: json, weight: -1}]"], ["data.mixture[0].weight must be above 0, found -1.0"]),
    # optim
    ("launch", ["optim=nosuch"], ["optim/nosuch", "adamw_cosine"]),
    ("launch", ["optim.lr=-0.1"], ["optim.lr must be above 0, found -0.1"]),
    ("launch", ["optim.weight_decay=-0.01"], ["optim.weight_decay must be at least 0, found -0.01"]),
    ("launch", ["optim.betas=[0.9,1.0]"], ["every element of optim.betas must be at least 0 and below 1, found [0.9, 1.0]"]),
    ("launch", ["optim.betas=[0.9]"], ["optim.betas must be two numbers", "found [0.9]"]),
    ("launch", ["optim.min_lr_ratio=2"], ["optim.min_lr_ratio must be at least 0 and at most 1, found 2.0"]),
    ("launch", ["optim.schedule=linearr"], ["optim.schedule", "linearr", "cosine"]),
    ("launch", ["optim.warmup_steps=-5"], ["optim.warmup_steps must be at least 0, found -5"]),
    (
        "launch",
        ["optim.warmup_steps=500", "train.steps=10"],
        ["optim.warmup_steps=500 must be below train.steps=10", "lower optim.warmup_steps"],
    ),
    (
        "launch",
        ["optim=adamw_wsd", "optim.warmup_steps=650"],
        ["optim.warmup_steps=650 and the wsd decay's 140 steps", "last 50 steps instead of 140", "at most 560"],
    ),
    # parallel
    (
        "launch",
        ["parallel.sequence=2"],
        ["parallel.sequence (2) x parallel.tensor (1) x parallel.expert (1) = 2 must divide the world size 1"],
    ),
    ("launch", [*SEQUENCE_2, "data.seq_len=127"], ["data.seq_len=127 must be divisible by parallel.sequence=2"]),
    ("launch", [*SEQUENCE_2, "model.num_heads=1", "model.num_kv_heads=1"], ["model.num_heads=1 must be divisible by parallel.sequence=2"]),
    (
        "launch",
        [*SEQUENCE_2, "model.attn_implementation=eager"],
        ["parallel.sequence=2 needs model.attn_implementation in", "found 'eager'"],
    ),
    # deepspeed
    ("launch", ["deepspeed=zero5"], ["deepspeed/zero5", "zero3"]),
    ("launch", ["deepspeed.stage=5"], ["deepspeed.stage must be one of [0, 1, 2, 3], found 5"]),
    ("launch", ["deepspeed=zero2", "deepspeed.offload_params=true"], ["deepspeed.offload_params needs ZeRO stage 3, found stage 2"]),
    (
        "launch",
        ["+deepspeed.zero_extra.overlap_commm=true"],
        ["deepspeed.zero_extra.overlap_commm", "extra inputs are not permitted", "found True"],
    ),
    (
        "launch",
        ["+deepspeed.zero_extra.reduce_bucket_size=big"],
        ["deepspeed.zero_extra.reduce_bucket_size", "valid integer", "found 'big'"],
    ),
    # cluster
    ("launch", ["cluster=nosuch"], ["cluster/nosuch", "h100"]),
    ("launch", ["cluster.nodes=2"], ["cluster=local runs on this machine alone, but cluster.nodes=2", "expected 1"]),
    ("launch", ["cluster.nproc_per_node=0"], ["cluster.nproc_per_node must be at least 1, found 0"]),
    (
        "launch",
        ["cluster=slurm", "cluster.nproc_per_node=1", "cluster.time=00:05:00"],
        ["cluster.time=00:05:00 (300 s) must be longer than cluster.warning_s=300"],
    ),
    (
        "launch",
        ["cluster=slurm", "cluster.nproc_per_node=1", "cluster.time=forever"],
        ["cluster.time must be a Slurm time limit", "days-hours:minutes:seconds", "UNLIMITED", "found 'forever'"],
    ),
    ("plan", ["cluster=h100", "cluster.time=2h"], ["cluster.time must be a Slurm time limit", "found '2h'"]),
    ("launch", ["cluster.gpu_memory_gb=-1"], ["cluster.gpu_memory_gb must be above 0, found -1.0"]),
    # logging
    ("launch", ["logging.every=0"], ["logging.every must be at least 1, found 0"]),
    ("launch", ["logging.level=LOUD"], ["logging.level must be one of ['DEBUG', 'INFO', 'WARNING', 'ERROR'], found 'LOUD'"]),
    ("launch", ["logging.wandb.mode=sometimes"], ["logging.wandb.mode must be one of", "found 'sometimes'"]),
    # experiment
    ("launch", ["experiment=nosuch"], ["experiment/nosuch", "smoke"]),
    # train
    ("launch", ["train.steps=0"], ["train.steps must be at least 1, found 0"]),
    ("launch", ["train.steps=many"], ["train.steps", "many"]),
    ("launch", ["train.stepz=3"], ["Could not override 'train.stepz'", "Key 'stepz' not in 'TrainConfig'"]),
    (
        "launch",
        ["train.global_batch_size=10", "train.micro_batch_size=4", "cluster.nproc_per_node=2"],
        ["train.global_batch_size=10 must be a positive multiple of", "data-parallel size (2) = 8"],
    ),
    ("launch", ["train.spike_zscore=-1"], ["train.spike_zscore must be above 0, found -1.0"]),
    ("launch", ["train.exit_interval=0"], ["train.exit_interval must be at least 1, found 0"]),
    # checkpoint
    ("launch", ["checkpoint.keep_last=0"], ["checkpoint.keep_last must be at least 1, found 0"]),
    ("launch", ["checkpoint.universal_timeout_s=0"], ["checkpoint.universal_timeout_s must be at least 1, found 0"]),
    ("universal", [], ["checkpoint.resume=auto finds no committed checkpoint in", "expected one to convert"]),
    (
        "launch",
        ["checkpoint.resume=/no/such/checkpoint"],
        ["checkpoint.resume must be auto, never or a checkpoint directory", "'/no/such/checkpoint'"],
    ),
    ("launch", ["run.dir=${nope}"], ["the config does not resolve", "Interpolation key 'nope' not found", "run.dir"]),
    # eval and generate
    ("launch", ["eval.batches=0"], ["eval.batches must be at least 1, found 0"]),
    ("evaluate", ["eval.every=-1"], ["eval.every must be at least 0, found -1"]),
    ("launch", ["eval.tasks=[./no/such/task.yaml]"], ["eval.tasks: no task YAML at", "no/such/task.yaml", "lm-eval ls tasks"]),
    ("evaluate", ["eval.tasks=[/no/such/tasks/]"], ["eval.tasks: no task YAML at /no/such/tasks", "a directory of them"]),
    ("generate", ["generate.top_p=0"], ["generate.top_p must be above 0 and at most 1, found 0.0"]),
    ("generate", ["generate.max_new_tokens=0"], ["generate.max_new_tokens must be at least 1, found 0"]),
    # throughput switches (issue 14) and streaming (issue 15)
    ("launch", ["model.compile=true"], ["model.compile", "true", "regional"]),
    ("launch", ["train.loss=liger"], ["train.loss=liger", "pip install liger-kernel"]),
    ("launch", ["model.attn_implementation=flash_attention_2"], ["model.attn_implementation=flash_attention_2", "pip install flash-attn"]),
    ("launch", ["train.loss_chunk_tokens=0"], ["train.loss_chunk_tokens must be at least 1, found 0"]),
    ("launch", ["data.stream_partitions=0"], ["data.stream_partitions must be at least 1, found 0"]),
    # the launcher's own section, through another command
    ("plan", ["launcher.assumed_mfu=1.5"], ["launcher.assumed_mfu must be above 0 and at most 1, found 1.5"]),
    ("train", ["optim.lr=0"], ["optim.lr must be above 0, found 0.0"]),
    ("prepare", ["data.seq_len=-3"], ["data.seq_len must be at least 1, found -3"]),
]


@pytest.fixture
def refuse(data_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """Run `zeroforge <command> <overrides>` here and return what it printed, after checking that
    it exited with 2, printed no traceback and trained nothing."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def run(command: str, overrides: list[str], run_dir: Path | None = None) -> str:
        base = [f"data.cache_dir={data_cache}", "logging.wandb.mode=disabled", f"run.dir={run_dir or tmp_path / 'run'}"]
        monkeypatch.setattr(sys, "argv", ["zeroforge"])
        with pytest.raises(SystemExit) as exit_:
            zeroforge([command, *base, *overrides])
        out = capsys.readouterr()
        output = out.out + out.err
        root.handlers, root.level = handlers[:], level
        assert exit_.value.code == 2, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        assert "zeroforge: " in out.err and "step 1 |" not in output, output[-3000:]
        return output

    return run


@pytest.mark.parametrize("command,overrides,expected", CONFIG_MISTAKES, ids=[" ".join([c, *o]) for c, o, _ in CONFIG_MISTAKES])
def test_a_config_mistake_is_refused_with_its_key_expectation_and_value(
    refuse, command: str, overrides: list[str], expected: list[str]
) -> None:
    output = refuse(command, overrides)
    for text in expected:
        assert text in output, f"{text!r} not in:\n{output[-2000:]}"


def test_a_config_file_that_is_not_yaml_is_refused(refuse, tmp_path: Path) -> None:
    broken = tmp_path / "myconf" / "experiment"
    broken.mkdir(parents=True)
    (broken / "broken.yaml").write_text("# @package _global_\noptim:\n  betas: [0.9, 0.95\n")
    output = refuse("launch", ["--config-dir", str(tmp_path / "myconf"), "experiment=broken"])
    assert "zeroforge: configuration error:" in output and "line 3" in output


def test_a_lower_case_log_level_is_a_log_level() -> None:
    from zeroforge.trainer.config import compose_config
    from zeroforge.trainer.validate import check_fields

    assert check_fields(compose_config(["logging.level=debug"])) == {}


def test_a_run_directory_of_another_run_is_refused(refuse, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 8.0}\n')
    output = refuse("launch", [])
    assert "already holds a run" in output and "no committed checkpoint to resume" in output
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 8.0}\n'


# A resume that would continue another run: refused by the launcher, before torchrun starts, from
# the checkpoint's manifest (the trainer checks the same again). The run is the 2-rank ZeRO-3
# smoke run with checkpoints at steps 10 and 20.
RESUME_MISTAKES = [
    (
        ["model.hidden_size=64", "model.num_heads=2", "model.num_kv_heads=2"],
        ["cannot resume from", "model.hidden_size: checkpoint 128, now 64"],
    ),
    (["data.seq_len=32"], ["cannot resume from", "data.seq_len: checkpoint 64, now 32"]),
    (["seed=7"], ["cannot resume from", "seed (the data order): checkpoint 1234, now 7"]),
    (["data.max_documents=300"], ["cannot resume from", "data fingerprint: checkpoint", "tokenizer: checkpoint"]),
    (["deepspeed=zero3-offload"], ["saved by 2 ranks and this run has 1", "ZeRO-Offload"]),
]


@pytest.mark.parametrize("overrides,expected", RESUME_MISTAKES, ids=[" ".join(o) for o, _ in RESUME_MISTAKES])
def test_a_resume_of_another_run_is_refused_before_any_rank_starts(
    refuse, zero3_smoke_run: Path, overrides: list[str], expected: list[str]
) -> None:
    before = sorted(p.name for p in zero3_smoke_run.iterdir())
    output = refuse("launch", ["experiment=smoke", "deepspeed=zero3", "train.precision=fp32", *overrides], run_dir=zero3_smoke_run)
    for text in expected:
        assert text in output, f"{text!r} not in:\n{output[-2000:]}"
    assert sorted(p.name for p in zero3_smoke_run.iterdir()) == before  # nothing written to the run


def test_a_resume_whose_universal_conversion_cannot_fit_is_refused_before_anything_starts(
    refuse, zero3_smoke_run: Path, tmp_path: Path
) -> None:
    """The 2-rank ZeRO-3 smoke run resumed on 1 rank, its optimizer-state files made 300 GiB each
    (sparse): converting one needs more host memory than cluster.host_memory_gb leaves."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(zero3_smoke_run / "checkpoints", run_dir / "checkpoints")
    for optimizer_states in (run_dir / "checkpoints" / "step_0000020").glob("*optim_states.pt"):
        os.truncate(optimizer_states, 300 * 2**30)
    before = sorted(run_dir.rglob("*"))
    output = refuse("launch", ["experiment=smoke", "deepspeed=zero3", "train.precision=fp32", "cluster.host_memory_gb=64"], run_dir=run_dir)
    assert "step_0000020 on another world size: converting it to DeepSpeed's universal checkpoint" in output
    assert "needs 400.5 GiB of host memory even with 1 extract and 1 merge worker" in output
    assert "cluster.host_memory_gb=64.0 (local)" in output and "Resume on the world size that saved it (2 ranks)" in output
    assert sorted(run_dir.rglob("*")) == before  # nothing converted, and nothing of the run written


def test_a_slurm_submission_refuses_a_resume_of_another_run_before_queueing(refuse, zero3_smoke_run: Path) -> None:
    slurm = ["cluster=slurm", "cluster.nproc_per_node=2", "cluster.gpus_per_node=0", "launcher.dry_run=true"]
    output = refuse("launch", ["experiment=smoke", "deepspeed=zero3", "train.precision=fp32", *slurm, "seed=7"], run_dir=zero3_smoke_run)
    assert "seed (the data order): checkpoint 1234, now 7" in output and "sbatch " not in output
