"""Evaluation: the perplexity of an export or a checkpoint is the trainer's, lm-eval is optional,
and the training loop's sanity samples reach samples.jsonl and wandb."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest

from tests.conftest import read_metrics, smoke_run_overrides
from tests.trainer.conftest import swap_two_tokens
from zeroforge.trainer.config import ConfigError, compose_config
from zeroforge.trainer.evaluate import evaluate
from zeroforge.trainer.generate import decode
from zeroforge.trainer.inference_model import load_model


def _val_loss(run_dir: Path, step: int) -> float:
    return next(r["val_loss"] for r in read_metrics(run_dir) if r["step"] == step and "val_loss" in r)


@pytest.mark.slow
@pytest.mark.parametrize("model_path,step", [("export", 20), ("checkpoints", 20), ("checkpoints/step_0000010", 10)])
def test_perplexity_equals_the_trainers_on_the_same_sequences(model_path: str, step: int, zero3_smoke_run: Path, data_cache: Path) -> None:
    cfg = compose_config([*smoke_run_overrides(data_cache, zero3_smoke_run), f"eval.model_path={zero3_smoke_run / model_path}"])
    result = evaluate(cfg)
    expected = _val_loss(zero3_smoke_run, step)
    assert result["val_loss"] == pytest.approx(expected, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert result["tokens"] == cfg.eval.batches * cfg.eval.batch_size * cfg.data.seq_len and result["tokens_per_s"] > 0


@pytest.mark.slow
def test_samples_at_every_eval_step_in_jsonl_and_the_offline_wandb_run(zero3_smoke_run: Path, data_cache: Path) -> None:
    cfg = compose_config(smoke_run_overrides(data_cache, zero3_smoke_run))
    prompts = list(cfg.eval.sample_prompts)
    records = [json.loads(line) for line in (zero3_smoke_run / "samples.jsonl").read_text().splitlines()]
    # Once per prompt and eval step: rank 0 wrote, the other rank only took part in the forwards.
    assert [(r["step"], r["prompt"]) for r in records] == [(s, p) for s in (10, 20) for p in prompts]
    # What the loop generated under ZeRO-3 is the trained model's own greedy continuation.
    loaded = load_model(zero3_smoke_run / "export", "cpu")
    final = decode(loaded.model, loaded.tokenizer, prompts, cfg.eval.sample_max_new_tokens)
    assert [r["text"] for r in records if r["step"] == 20] == [s.text for s in final]

    tables = sorted((zero3_smoke_run / "wandb").glob("offline-run-*/files/media/table/samples_*.table.json"))
    assert len(tables) == 2, tables
    last = json.loads(tables[-1].read_text()) if "_20_" in tables[-1].name else json.loads(tables[0].read_text())
    assert last["columns"] == ["step", "prompt", "text"]
    assert last["data"] == [[r["step"], r["prompt"], r["text"]] for r in records]


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm_eval is installed")
def test_lm_eval_tasks_without_lm_eval_say_so_and_still_evaluate(tiny_export: Path, data_cache: Path, caplog) -> None:
    cfg = compose_config([f"data.cache_dir={data_cache}", f"eval.model_path={tiny_export}", "eval.tasks=[hellaswag]", "eval.batches=1"])
    with caplog.at_level("WARNING", logger="zeroforge"):
        result = evaluate(cfg)
    assert "tasks" not in result and result["perplexity"] > 1
    assert "eval.tasks=['hellaswag'] not run: lm-evaluation-harness is not installed" in caplog.text


def test_evaluate_refuses_data_tokenized_with_another_tokenizer(tiny_export: Path, data_cache: Path, tmp_path: Path) -> None:
    other = swap_two_tokens(tiny_export, tmp_path / "other")
    with pytest.raises(ConfigError, match="is not the one the data in .* was tokenized with"):
        evaluate(compose_config([f"data.cache_dir={data_cache}", f"eval.model_path={other}"]))


@pytest.mark.slow
def test_missing_or_incomplete_checkpoints_are_refused(zero3_smoke_run: Path, data_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no model at"):
        evaluate(compose_config([f"data.cache_dir={data_cache}", f"eval.model_path={tmp_path / 'run' / 'checkpoints'}"]))

    run = tmp_path / "copy"
    shutil.copytree(zero3_smoke_run / "checkpoints" / "step_0000010", run / "checkpoints" / "step_0000010")
    shutil.copy(zero3_smoke_run / "config.yaml", run / "config.yaml")
    shard = next((run / "checkpoints" / "step_0000010").glob("*rank_1_*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ConfigError, match=f"incomplete: {shard.name} should have"):
        evaluate(compose_config([f"data.cache_dir={data_cache}", f"eval.model_path={run / 'checkpoints' / 'step_0000010'}"]))

    # A checkpoint whose tokenizer (recorded in the manifest) is not its run's data's.
    manifest = run / "checkpoints" / "step_0000010" / "manifest.json"
    spec = json.loads(manifest.read_text())
    spec["files"][shard.name]["bytes"] -= 10
    spec["run"]["tokenizer_hash"] = "0" * 16
    manifest.write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="is not the one checkpoint .* was trained with"):
        evaluate(compose_config([f"data.cache_dir={data_cache}", f"eval.model_path={run / 'checkpoints' / 'step_0000010'}"]))
