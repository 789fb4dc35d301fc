"""Evaluation: the perplexity of an export or a checkpoint is the trainer's, lm-eval's tasks (task
YAMLs of our own, offline) run through the real harness and are refused clearly where they cannot,
lm-eval is optional, and the training loop's sanity samples reach samples.jsonl and wandb."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import datasets
import pytest
import torch
import yaml

from tests.conftest import read_metrics, smoke_run_overrides
from tests.trainer.conftest import swap_two_tokens
from zeroforge.trainer.config import ConfigError, compose_config
from zeroforge.trainer.evaluate import evaluate
from zeroforge.trainer.generate import decode
from zeroforge.trainer.inference_model import LoadedModel, load_model


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


def _write_task(path: Path, task: str, docs: list[dict], **config: object) -> Path:
    """A task YAML of our own over a JSONL file beside it: nothing in it comes from the Hub."""
    data = path.with_name(f"{task}.jsonl")
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    spec = {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test", **config}
    path.write_text(yaml.safe_dump(spec))
    return path


def _loglikelihood(loaded: LoadedModel, context: str, continuation: str) -> float:
    """log p(continuation | context) as lm-eval's HF adapter splits it: the whole text encoded, the
    context's tokens cut off."""
    whole = loaded.tokenizer.encode(context + continuation)
    start = len(loaded.tokenizer.encode(context))
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = loaded.model(ids[:, :-1]).logits.float().log_softmax(-1)
    return logprobs[0, start - 1 :].gather(-1, ids[0, start:, None]).sum().item()


CONTINUATIONS = [
    {"context": "import", "continuation": " os"},
    {"context": "def main(", "continuation": "self):"},
    {"context": "class Foo", "continuation": "(object):"},
]


def test_local_task_yamls_run_through_lm_eval_offline(tiny_export: Path, data_cache: Path, tmp_path: Path, caplog) -> None:
    # tests/conftest.py set these before `datasets` was imported: nothing can be downloaded.
    assert os.environ["HF_DATASETS_OFFLINE"] == os.environ["HF_HUB_OFFLINE"] == "1"
    continuation = _write_task(
        tmp_path / "continuation.yaml",
        "zf_continuation",
        CONTINUATIONS,
        output_type="loglikelihood",
        doc_to_text="{{context}}",
        doc_to_target="{{continuation}}",
        target_delimiter="",
        metric_list=[{"metric": "perplexity"}],
    )
    # A directory: a group and its member task, the member run once, inside its group.
    suite = tmp_path / "suite"
    suite.mkdir()
    choices = [{"q": "import", "choices": [" os", " (("], "label": 0}, {"q": "def", "choices": [" main():", " 1 +"], "label": 0}]
    _write_task(
        suite / "choice.yaml",
        "zf_choice",
        choices,
        output_type="multiple_choice",
        doc_to_text="{{q}}",
        doc_to_choice="{{choices}}",
        doc_to_target="label",
        metric_list=[{"metric": "acc"}],
    )
    (suite / "group.yaml").write_text(yaml.safe_dump({"group": "zf_suite", "task": ["zf_choice"]}))
    overrides = [f"data.cache_dir={data_cache}", f"eval.model_path={tiny_export}", "eval.batches=1", "eval.tasks_limit=2"]
    with caplog.at_level("INFO", logger="zeroforge"):
        result = evaluate(compose_config([*overrides, f"eval.tasks=[{continuation},{suite}/]"]))

    tasks = result["tasks"]
    assert {"zf_continuation", "zf_suite", "zf_choice"} <= set(tasks), tasks
    # lm-eval scored this model: its perplexity over the first eval.tasks_limit documents is ours.
    loaded = load_model(tiny_export, "cpu")
    ours = [_loglikelihood(loaded, doc["context"], doc["continuation"]) for doc in CONTINUATIONS[:2]]
    assert tasks["zf_continuation"]["perplexity,none"] == pytest.approx(math.exp(-sum(ours) / len(ours)), rel=1e-4)
    assert tasks["zf_choice"]["acc,none"] in (0.0, 0.5, 1.0)
    assert f"zf_continuation: perplexity,none {tasks['zf_continuation']['perplexity,none']:.4f}" in caplog.text


@pytest.mark.parametrize("missing", ["lm_eval", "accelerate"])
def test_lm_eval_tasks_without_the_eval_extra_say_so_and_still_evaluate(
    missing: str, tiny_export: Path, data_cache: Path, caplog, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if not installed: lm-eval itself, or accelerate, which its HF backend imports and plain
    # `pip install lm-eval` does not bring.
    monkeypatch.delitem(sys.modules, "lm_eval.models.huggingface", raising=False)
    monkeypatch.setitem(sys.modules, missing, None)
    cfg = compose_config([f"data.cache_dir={data_cache}", f"eval.model_path={tiny_export}", "eval.tasks=[hellaswag]", "eval.batches=1"])
    with caplog.at_level("WARNING", logger="zeroforge"):
        result = evaluate(cfg)
    assert "tasks" not in result and result["perplexity"] > 1
    assert f"eval.tasks=['hellaswag'] not run: {missing} is not installed (pip install 'zeroforge[eval]'" in caplog.text


def test_an_unknown_task_is_refused_before_the_model_loads(data_cache: Path, tmp_path: Path) -> None:
    # No model at eval.model_path: the task names are checked first.
    overrides = [f"data.cache_dir={data_cache}", f"eval.model_path={tmp_path / 'no-model'}", "eval.tasks=[hellaswg]"]
    with pytest.raises(ConfigError) as refused:
        evaluate(compose_config(overrides))
    message = str(refused.value)
    for text in [
        "eval.tasks: 'hellaswg' is not a task of lm-evaluation-harness",
        "the closest: hellaswag",
        "lm-eval ls tasks",
        "./my_task.yaml",
    ]:
        assert text in message, message


def test_a_task_whose_dataset_is_out_of_reach_is_refused_before_the_model_loads(data_cache: Path, tmp_path: Path) -> None:
    # A Hub dataset on a machine offline (tests/conftest.py), as on a compute node without network.
    hub = tmp_path / "hub.yaml"
    hub.write_text(
        yaml.safe_dump(
            {
                "task": "zf_hub",
                "dataset_path": "zeroforge/not-in-any-cache",
                "output_type": "loglikelihood",
                "test_split": "test",
                "doc_to_text": "{{a}}",
                "doc_to_target": "{{b}}",
            }
        )
    )
    overrides = [f"data.cache_dir={data_cache}", f"eval.model_path={tmp_path / 'no-model'}", f"eval.tasks=[{hub}]"]
    with pytest.raises(ConfigError) as refused:
        evaluate(compose_config(overrides))
    message = str(refused.value)
    expected = [
        f"the dataset of '{hub}' could not be loaded",
        "zeroforge/not-in-any-cache",
        datasets.config.HF_DATASETS_CACHE,
        "HF_DATASETS_OFFLINE=1",
        "task YAML of your own over local files",
    ]
    for text in expected:
        assert str(text) in message, message


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
