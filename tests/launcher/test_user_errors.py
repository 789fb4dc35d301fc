"""Bad input through the real entry points: one clear paragraph before training, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, TORCHRUN, run_module


def _fails_clearly(module: str, args: list[str], *expected: str) -> str:
    result = run_module(module, args, cwd=REPO, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-2000:]
    assert "Traceback" not in output, output[-3000:]
    assert "step 1 |" not in output, "training started before the error was found"
    for text in expected:
        assert text in output, f"{text!r} not in:\n{output[-2000:]}"
    return output


@pytest.fixture
def base(data_cache: Path, tmp_path: Path) -> list[str]:
    return [f"data.cache_dir={data_cache}", f"run.dir={tmp_path / 'run'}", "logging.wandb.mode=disabled"]


def test_unknown_config_key(base: list[str]) -> None:
    _fails_clearly("zeroforge.launcher", [*base, "train.stepz=3"], "Could not override 'train.stepz'", "Key 'stepz' not in 'TrainConfig'")


def test_indivisible_global_batch(base: list[str]) -> None:
    _fails_clearly(
        "zeroforge.launcher",
        [*base, "train.global_batch_size=10", "train.micro_batch_size=4", "cluster.nproc_per_node=2"],
        "zeroforge: configuration error: train.global_batch_size=10",
        "data-parallel size (2) = 8",
    )


def test_sequence_longer_than_the_model(base: list[str]) -> None:
    _fails_clearly("zeroforge.launcher", [*base, "data.seq_len=4096"], "data.seq_len=4096", "max_position_embeddings=1024")


@pytest.mark.parametrize("module", ["zeroforge.launcher", "zeroforge.trainer.train"])
def test_tokenizer_larger_than_the_model(module: str, base: list[str]) -> None:
    _fails_clearly(module, [*base, "model.vocab_size=256"], "the tokenizer has 4096 tokens but model.vocab_size=256")


def test_missing_corpus(base: list[str], tmp_path: Path) -> None:
    _fails_clearly(
        "zeroforge.launcher",
        [*base, "data.source=json", f"data.data_files=[{tmp_path}/absent/*.jsonl]"],
        "zeroforge: data error",
        "absent/*.jsonl",
    )


def test_empty_corpus(base: list[str], tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    _fails_clearly(
        "zeroforge.launcher",
        [*base, "data.source=json", f"data.data_files=[{tmp_path}/empty.jsonl]", f"data.cache_dir={tmp_path}/cache"],
        "zeroforge: data error",
        "yielded no documents",
    )


def test_zero_stage_that_does_not_exist(base: list[str]) -> None:
    _fails_clearly("zeroforge.launcher", [*base, "deepspeed=zero5"], "deepspeed/zero5", "zero3")
    _fails_clearly("zeroforge.launcher", [*base, "deepspeed.stage=5"], "deepspeed.stage must be one of [0, 1, 2, 3], found 5")


def test_run_directory_of_another_run_is_refused(base: list[str], tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 8.0}\n')
    _fails_clearly("zeroforge.launcher", base, "already holds a run", "no committed checkpoint to resume")
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 8.0}\n'


@pytest.mark.slow
def test_rank_zero_failure_stops_every_rank_promptly(base: list[str], tmp_path: Path) -> None:
    args = [
        *base,
        "experiment=smoke",
        "data.source=json",
        f"data.data_files=[{tmp_path}/absent/*.jsonl]",
        f"data.cache_dir={tmp_path}/cache",
    ]
    result = run_module("zeroforge.trainer.train", args, cwd=REPO, launcher=TORCHRUN, timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "zeroforge: data error" in output and "absent/*.jsonl" in output
    assert "zeroforge: stopped: rank 1 stops: rank 0 failed during start-up" in output
