"""Samples from an export or a checkpoint: `zeroforge generate [overrides]`.

Prompts come from generate.prompts or generate.prompts_file, are batched with left padding and
decoded with the KV cache (greedy at temperature 0, otherwise sampled); with
generate.draft_model_path, a smaller model with the same tokenizer drafts tokens that the model
verifies (assisted decoding: the same output, fewer forwards of the large model).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence, cast

import torch
from omegaconf import DictConfig
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from zeroforge.data.tokenizer import tokenizer_hash
from zeroforge.trainer.config import ConfigError
from zeroforge.trainer.entry import entry_point
from zeroforge.trainer.inference_model import inference_dtype, load_model, pick_device
from zeroforge.trainer.log import setup_logging
from zeroforge.trainer.partitioned import full_numel

log = logging.getLogger("zeroforge")


@dataclass
class Sample:
    prompt: str
    text: str  # the continuation only
    tokens: list[int]  # the continuation's token ids, up to and including EOS
    tokens_per_s: float
    finish: str  # "eos", "stop" (a stop string) or "length" (max_new_tokens)


def read_prompts(g: DictConfig) -> list[str]:
    """generate.prompts_file (plain lines, or jsonl with a "prompt" field) when set, else generate.prompts."""
    if g.prompts_file is None:
        prompts = list(g.prompts)
        source = "generate.prompts"
    else:
        path = Path(g.prompts_file)
        if not path.is_file():
            raise ConfigError(f'generate.prompts_file={path}: no such file; expected one prompt a line, or jsonl with a "prompt" field.')
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if path.suffix == ".jsonl":
            try:
                prompts = [json.loads(line)["prompt"] for line in lines]
            except (ValueError, KeyError, TypeError) as err:
                raise ConfigError(
                    f'generate.prompts_file={path}: expected a JSON object with a "prompt" field on every line ({err!r}).'
                ) from None
        else:
            prompts = lines
        source = f"generate.prompts_file={path}"
    if not prompts:
        raise ConfigError(f"{source} holds no prompts; expected at least one.")
    if any(not isinstance(p, str) or not p for p in prompts):
        raise ConfigError(f"{source}: every prompt must be a non-empty string, found {prompts!r}.")
    return prompts


def check_context(model: PreTrainedModel, prompt_tokens: int, max_new_tokens: int, what: str = "the model") -> None:
    context = model.config.max_position_embeddings
    if prompt_tokens + max_new_tokens > context:
        raise ConfigError(
            f"the longest prompt ({prompt_tokens} tokens) + generate.max_new_tokens={max_new_tokens} = "
            f"{prompt_tokens + max_new_tokens} tokens exceeds the context of {what}, {context} tokens; "
            "shorten the prompt or lower generate.max_new_tokens."
        )


def memory_bytes(model: PreTrainedModel, batch: int, context: int) -> dict[str, int]:
    """Weights plus the KV cache that `batch` sequences of `context` tokens fill."""
    c = model.config
    weights = sum(full_numel(t) * t.element_size() for t in [*model.parameters(), *model.buffers()])
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    element = next(model.parameters()).element_size()
    kv_cache = 2 * c.num_hidden_layers * batch * context * kv_heads * head_dim * element  # keys and values
    return {"weights": weights, "kv_cache": kv_cache}


@torch.no_grad()
def decode(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    stop: Sequence[str] = (),
    use_cache: bool = True,
    assistant: Optional[PreTrainedModel] = None,
    synced_gpus: bool = False,
) -> list[Sample]:
    """Continue all prompts as one left-padded batch (one at a time with an assistant, which
    transformers supports only at batch size 1). synced_gpus: every rank runs the same number of
    forwards, as ZeRO-3 needs (each forward gathers parameters from all ranks)."""
    model.eval()
    device = next(model.parameters()).device
    sampled = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampled,
        temperature=temperature if sampled else None,
        top_k=top_k if sampled and top_k > 0 else None,
        top_p=top_p if sampled and top_p < 1.0 else None,
        repetition_penalty=repetition_penalty if repetition_penalty != 1.0 else None,
        stop_strings=list(stop) or None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=use_cache,
    )
    groups = [[p] for p in prompts] if assistant is not None else [list(prompts)]
    samples = []
    for group in groups:
        enc = tokenizer(group, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(device)
        started = time.perf_counter()
        out = model.generate(**enc, generation_config=config, tokenizer=tokenizer, assistant_model=assistant, synced_gpus=synced_gpus)  # type: ignore[operator]  # GenerationMixin.generate
        seconds = time.perf_counter() - started
        for prompt, row in zip(group, out[:, enc["input_ids"].shape[1] :].tolist()):
            samples.append(_sample(prompt, row, tokenizer, stop, seconds))
    return samples


def _sample(prompt: str, row: list[int], tokenizer: PreTrainedTokenizerBase, stop: Sequence[str], seconds: float) -> Sample:
    eos = tokenizer.eos_token_id
    # Rows that finished early are padded to the batch's length, with EOS (our pad token).
    tokens = row[: row.index(eos) + 1] if eos in row else row
    text = cast(str, tokenizer.decode(tokens, skip_special_tokens=True))  # one sequence: one string
    hits = [text.index(s) + len(s) for s in stop if s in text]
    if not hits:
        return Sample(prompt, text, tokens, len(tokens) / seconds, "eos" if eos in row else "length")
    if tokens[-1] == eos:
        tokens = tokens[:-1]  # padding after the stop string, not a generated EOS
    # The last token may run past the stop string; the text ends with it.
    return Sample(prompt, text[: min(hits)], tokens, len(tokens) / seconds, "stop")


def generate(cfg: DictConfig) -> list[Sample]:
    """Samples for every prompt: printed, and written as jsonl to generate.output when set."""
    g = cfg.generate
    prompts = read_prompts(g)
    device = pick_device()
    dtype = inference_dtype(g.precision, device)
    loaded = load_model(g.model_path, device, dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    longest = max(len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"])
    check_context(model, longest, g.max_new_tokens)
    assistant = None
    if g.draft_model_path:
        draft = load_model(g.draft_model_path, device, dtype)
        if tokenizer_hash(draft.tokenizer) != tokenizer_hash(tokenizer):
            raise ConfigError(
                f"the draft model at {g.draft_model_path} has another tokenizer than the model at {g.model_path}; "
                "assisted decoding needs a draft model trained with the same tokenizer."
            )
        check_context(draft.model, longest, g.max_new_tokens, f"the draft model at {g.draft_model_path}")
        assistant = draft.model

    batch = 1 if assistant is not None else min(g.batch_size, len(prompts))
    memory = memory_bytes(model, batch, longest + g.max_new_tokens)
    if assistant is not None:
        draft_memory = memory_bytes(assistant, batch, longest + g.max_new_tokens)
        memory = {k: memory[k] + draft_memory[k] for k in memory}
    log.info(
        "%s | %s | memory: weights %.1f MB + KV cache %.1f MB (batch %d x %d tokens)%s",
        loaded.source,
        str(dtype).removeprefix("torch."),
        memory["weights"] / 1e6,
        memory["kv_cache"] / 1e6,
        batch,
        longest + g.max_new_tokens,
        f" | draft {g.draft_model_path}" if assistant is not None else "",
    )

    torch.manual_seed(g.seed)
    samples: list[Sample] = []
    for start in range(0, len(prompts), g.batch_size):
        samples += decode(
            model,
            tokenizer,
            prompts[start : start + g.batch_size],
            g.max_new_tokens,
            temperature=g.temperature,
            top_k=g.top_k,
            top_p=g.top_p,
            repetition_penalty=g.repetition_penalty,
            stop=list(g.stop),
            assistant=assistant,
        )
    for s in samples:
        print(f"----- sample -----\n{s.prompt}{s.text}\n", flush=True)
        log.info("%d tokens | %.1f tokens/s | finish: %s", len(s.tokens), s.tokens_per_s, s.finish)
    if g.output:
        _write_jsonl(Path(g.output), [asdict(s) for s in samples])
        log.info("wrote %d samples to %s", len(samples), g.output)
    return samples


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


@entry_point
def main(cfg: DictConfig) -> None:
    setup_logging(0, cfg.logging.level)
    generate(cfg)


if __name__ == "__main__":
    main()
