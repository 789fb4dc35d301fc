"""Held-out loss and perplexity of an export: `python -m trainer.evaluate [overrides]`."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from data.loader import validation_batches
from data.prepare import prepare
from data.shards import TokenStore
from data.tokenizer import tokenizer_hash
from launcher.cli import run_entry_point
from launcher.config import CONF_DIR, ConfigError
from trainer.engine import validation_loss
from trainer.export_io import load_export, pick_device
from trainer.log import setup_logging

log = logging.getLogger("zeroforge")


def _validation_data(cfg: DictConfig) -> Path:
    """The data the export was trained on, where it recorded it and it still exists; else cfg.data."""
    meta = Path(cfg.eval.model_path) / "zeroforge.json"
    if meta.exists():
        recorded = Path(json.loads(meta.read_text()).get("prepared_data", ""))
        if (recorded / "manifest.json").exists():
            return recorded
    return prepare(cfg.data)


def evaluate(cfg: DictConfig) -> dict:
    """Mean loss over the fixed validation windows (the same numbers every run)."""
    device = pick_device()
    model, tokenizer = load_export(cfg.eval.model_path, device)
    prepared = _validation_data(cfg)
    store = TokenStore(prepared, "validation")
    if store.manifest["tokenizer_hash"] != tokenizer_hash(tokenizer):
        raise ConfigError(
            f"the tokenizer of the model at {cfg.eval.model_path} is not the one the data in "
            f"{prepared} was tokenized with ({store.manifest['tokenizer']!r}); evaluate on data "
            "prepared with the model's tokenizer."
        )
    batches = validation_batches(store, cfg.data.seq_len, cfg.eval.batch_size, cfg.eval.batches)
    started = time.perf_counter()
    loss = validation_loss(model, batches, device)
    tokens = sum(b[:, 1:].numel() for b in batches)
    result = {
        "val_loss": loss,
        "perplexity": math.exp(loss),
        "tokens": tokens,
        "tokens_per_s": tokens / (time.perf_counter() - started),
    }
    log.info(
        "held-out loss %.4f | perplexity %.2f | %d tokens | %.0f tokens/s",
        loss, result["perplexity"], tokens, result["tokens_per_s"],
    )
    return result


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup_logging(0, cfg.logging.level)
    run_entry_point(lambda: evaluate(cfg))


if __name__ == "__main__":
    main()
