"""Sanity samples from an export: `python -m trainer.generate [overrides]`."""
from __future__ import annotations

import logging

import hydra
import torch
from omegaconf import DictConfig

from launcher.cli import run_entry_point
from launcher.config import CONF_DIR, ConfigError
from trainer.export_io import load_export, pick_device
from trainer.log import setup_logging

log = logging.getLogger("zeroforge")


def generate(cfg: DictConfig) -> list[str]:
    """Continue each prompt (batched, left-padded, with the KV cache); returns prompt + continuation."""
    g = cfg.generate
    prompts = list(g.prompts)
    if not prompts or any(not p for p in prompts):
        raise ConfigError(f"generate.prompts must be non-empty strings, found {prompts!r}.")
    device = pick_device()
    model, tokenizer = load_export(g.model_path, device)
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    longest = enc["input_ids"].shape[1] + g.max_new_tokens
    if longest > model.config.max_position_embeddings:
        raise ConfigError(
            f"prompt ({enc['input_ids'].shape[1]} tokens) + generate.max_new_tokens={g.max_new_tokens} "
            f"exceeds the model's context of {model.config.max_position_embeddings} tokens."
        )
    torch.manual_seed(g.seed)
    sampled = g.temperature > 0
    out = model.generate(
        **enc,
        max_new_tokens=g.max_new_tokens,
        do_sample=sampled,
        temperature=g.temperature if sampled else None,
        top_k=g.top_k if sampled else None,
        top_p=g.top_p if sampled else None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    texts = [
        prompt + tokenizer.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for prompt, row in zip(prompts, out)
    ]
    for text in texts:
        print(f"----- sample -----\n{text}\n", flush=True)
    return texts


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup_logging(0, cfg.logging.level)
    run_entry_point(lambda: generate(cfg))


if __name__ == "__main__":
    main()
