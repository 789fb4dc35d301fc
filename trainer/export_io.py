"""Loading an HF export (ours or any causal LM directory) for evaluation and generation."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from data.tokenizer import load_tokenizer
from launcher.config import ConfigError
from launcher.validate import accelerator_is_cuda


def pick_device() -> str:
    return "cuda" if accelerator_is_cuda() else "cpu"


def load_export(path: str | Path, device: str, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = Path(path)
    if not (path / "config.json").exists():
        raise ConfigError(
            f"no model at {path}: expected an export directory with config.json, weights and a "
            "tokenizer, as training writes to <run.dir>/export (set eval.model_path or "
            "generate.model_path)."
        )
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(
            f"the tokenizer in {path} has {len(tokenizer)} tokens but the model's vocabulary has "
            f"{model.config.vocab_size}; they do not belong together."
        )
    model.eval()
    return model, tokenizer
