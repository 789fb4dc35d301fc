"""Generation: greedy equals a plain forward loop, the cache and a draft model change nothing but
speed, sampling is reproducible, and bad input is refused with a clear message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_module
from tests.trainer.conftest import swap_two_tokens
from zeroforge.trainer.config import ConfigError, compose_config
from zeroforge.trainer.generate import decode, generate
from zeroforge.trainer.inference_model import load_model

# Different lengths, so the batch is left-padded.
PROMPTS = ["import os\n", "def main(argv):\n    return", "class "]
NEW = 24


@torch.no_grad()
def reference_greedy(model, tokenizer, prompt: str, new_tokens: int, repetition_penalty: float = 1.0) -> list[int]:
    """One prompt, no cache, no padding: the whole sequence through the model for every token."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    out: list[int] = []
    for _ in range(new_tokens):
        logits = model(input_ids=ids, use_cache=False).logits[0, -1]
        if repetition_penalty != 1.0:  # CTRL: seen tokens' logits shrink towards (or below) zero
            seen = ids[0].unique()
            logits[seen] = torch.where(logits[seen] > 0, logits[seen] / repetition_penalty, logits[seen] * repetition_penalty)
        token = int(logits.argmax())
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        if token == tokenizer.eos_token_id:
            break
    return out


def _overrides(model_path: Path, *extra: str) -> list[str]:
    return [f"generate.model_path={model_path}", "logging.wandb.mode=disabled", *extra]


def test_greedy_batched_with_cache_equals_a_plain_forward_loop(tiny_export: Path) -> None:
    loaded = load_model(tiny_export, "cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    first = decode(model, tokenizer, PROMPTS, NEW)
    again = decode(model, tokenizer, PROMPTS, NEW)
    no_cache = decode(model, tokenizer, PROMPTS, NEW, use_cache=False)
    expected = [reference_greedy(model, tokenizer, p, NEW) for p in PROMPTS]
    assert [s.tokens for s in first] == expected
    assert [s.tokens for s in again] == expected
    assert [s.tokens for s in no_cache] == expected
    assert [s.text for s in first] == [tokenizer.decode(t, skip_special_tokens=True) for t in expected]
    assert all(s.finish == "length" and s.tokens_per_s > 0 for s in first)


def test_repetition_penalty_matches_the_reference(tiny_export: Path) -> None:
    loaded = load_model(tiny_export, "cpu")
    penalised = decode(loaded.model, loaded.tokenizer, PROMPTS[:1], NEW, repetition_penalty=1.5)
    assert penalised[0].tokens == reference_greedy(loaded.model, loaded.tokenizer, PROMPTS[0], NEW, 1.5)
    assert penalised[0].tokens != reference_greedy(loaded.model, loaded.tokenizer, PROMPTS[0], NEW)


def test_speculative_decoding_gives_the_target_greedy_output(tiny_export: Path, draft_export: Path, tmp_path: Path) -> None:
    target = load_model(tiny_export, "cpu")
    expected = [reference_greedy(target.model, target.tokenizer, p, NEW) for p in PROMPTS]
    draft = load_model(draft_export, "cpu").model
    # The draft really is another model: alone, it decodes something else.
    assert [s.tokens for s in decode(draft, target.tokenizer, PROMPTS, NEW)] != expected
    assisted = decode(target.model, target.tokenizer, PROMPTS, NEW, assistant=draft)
    assert [s.tokens for s in assisted] == expected

    # Through the entry point's function, with its config (prompts from a file: they hold newlines).
    prompts, output = tmp_path / "prompts.jsonl", tmp_path / "samples.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    cfg = compose_config(
        _overrides(
            tiny_export,
            f"generate.draft_model_path={draft_export}",
            "generate.temperature=0",
            f"generate.max_new_tokens={NEW}",
            f"generate.prompts_file={prompts}",
            f"generate.output={output}",
        )
    )
    assert [s.tokens for s in generate(cfg)] == expected
    assert [json.loads(line)["tokens"] for line in output.read_text().splitlines()] == expected


def test_sampling_is_reproducible_from_the_seed(tiny_export: Path) -> None:
    def sampled(seed: int) -> list[list[int]]:
        cfg = compose_config(
            _overrides(
                tiny_export,
                "generate.temperature=1.0",
                "generate.top_k=50",
                "generate.top_p=0.9",
                f"generate.seed={seed}",
                f"generate.max_new_tokens={NEW}",
            )
        )
        return [s.tokens for s in generate(cfg)]

    assert sampled(0) == sampled(0)
    assert sampled(0) != sampled(1)


def test_stop_strings_end_the_text(tiny_export: Path) -> None:
    loaded = load_model(tiny_export, "cpu")
    full = decode(loaded.model, loaded.tokenizer, PROMPTS, NEW)
    stop = full[0].text[4:7]  # somewhere inside the first prompt's greedy continuation
    assert all(stop not in s.text for s in full[1:])
    # In a batch whose other rows go on to max_new_tokens.
    stopped = decode(loaded.model, loaded.tokenizer, PROMPTS, NEW, stop=[stop])
    first = stopped[0]
    assert first.text == full[0].text[: full[0].text.index(stop) + len(stop)] and first.finish == "stop"
    # Exactly the tokens up to the one that completed the stop string (none of the padding).
    assert stop not in loaded.tokenizer.decode(first.tokens[:-1]) and first.tokens == full[0].tokens[: len(first.tokens)]
    assert [s.tokens for s in stopped[1:]] == [s.tokens for s in full[1:]]


@pytest.mark.parametrize("kind", ["lines", "jsonl"])
def test_prompts_file_and_jsonl_output(kind: str, tiny_export: Path, tmp_path: Path) -> None:
    prompts = ["import sys", "x = [1, 2"]
    path = tmp_path / ("prompts.jsonl" if kind == "jsonl" else "prompts.txt")
    lines = [json.dumps({"prompt": p}) for p in prompts] if kind == "jsonl" else prompts
    path.write_text("\n".join(lines) + "\n\n")
    output = tmp_path / "out" / "samples.jsonl"
    cfg = compose_config(
        _overrides(
            tiny_export,
            f"generate.prompts_file={path}",
            f"generate.output={output}",
            "generate.max_new_tokens=8",
            "generate.batch_size=1",
        )
    )
    samples = generate(cfg)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["prompt"] for r in records] == prompts == [s.prompt for s in samples]
    assert all(len(r["tokens"]) == 8 and r["tokens_per_s"] > 0 and r["text"] for r in records)


def test_memory_of_weights_and_kv_cache_is_reported(tiny_export: Path, caplog) -> None:
    from zeroforge.trainer.generate import memory_bytes

    model = load_model(tiny_export, "cpu").model
    c = model.config
    memory = memory_bytes(model, batch=4, context=100)
    head_dim = c.hidden_size // c.num_attention_heads
    assert memory["kv_cache"] == 2 * c.num_hidden_layers * 4 * 100 * c.num_key_value_heads * head_dim * 4
    assert memory["weights"] == sum(p.numel() * 4 for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())
    with caplog.at_level("INFO", logger="zeroforge"):
        generate(compose_config(_overrides(tiny_export, "generate.max_new_tokens=4")))
    assert "memory: weights" in caplog.text and "KV cache" in caplog.text


def test_bad_input_is_refused_with_a_clear_message(tiny_export: Path, draft_export: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no model at .*nowhere"):
        generate(compose_config(_overrides(tmp_path / "nowhere")))

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ConfigError, match="holds no prompts"):
        generate(compose_config(_overrides(tiny_export, f"generate.prompts_file={empty}")))
    with pytest.raises(ConfigError, match="no such file"):
        generate(compose_config(_overrides(tiny_export, f"generate.prompts_file={tmp_path / 'missing.txt'}")))

    with pytest.raises(ConfigError, match=r"exceeds the context of the model, 1024 tokens"):
        generate(compose_config(_overrides(tiny_export, "generate.max_new_tokens=1024")))

    # A tokenizer with more tokens than the model has embeddings.
    bigger = tmp_path / "bigger"
    shutil.copytree(tiny_export, bigger)
    tokenizer = load_model(tiny_export, "cpu").tokenizer
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(10)])
    tokenizer.save_pretrained(bigger)
    with pytest.raises(ConfigError, match="has 4106 tokens but the model's vocabulary has 4096"):
        generate(compose_config(_overrides(bigger)))

    # A draft model whose tokenizer maps tokens differently.
    other = swap_two_tokens(draft_export, tmp_path / "other-draft")
    with pytest.raises(ConfigError, match="another tokenizer"):
        generate(compose_config(_overrides(tiny_export, f"generate.draft_model_path={other}")))


def test_the_entry_point_reports_a_missing_model_without_a_traceback(tmp_path: Path) -> None:
    result = run_module("zeroforge.trainer.generate", [f"generate.model_path={tmp_path / 'nowhere'}"], cwd=REPO)
    assert result.returncode == 2
    assert "configuration error: no model at" in result.stderr and "Traceback" not in result.stderr
