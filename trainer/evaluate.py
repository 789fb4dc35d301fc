"""Held-out loss and perplexity of an export or a checkpoint: `zeroforge evaluate [overrides]`."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from omegaconf import DictConfig

from zeroforge.data.build import open_data
from zeroforge.data.loader import validation_batches
from zeroforge.data.mixture import open_split
from zeroforge.data.tokenizer import tokenizer_hash
from zeroforge.trainer.config import ConfigError
from zeroforge.trainer.engine import validation_loss
from zeroforge.trainer.entry import entry_point
from zeroforge.trainer.inference_model import inference_dtype, load_model, pick_device
from zeroforge.trainer.lm_eval_tasks import prepare_tasks, run_tasks
from zeroforge.trainer.log import setup_logging

log = logging.getLogger("zeroforge")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Mean loss over the fixed validation windows (the same numbers every run), and the
    lm-evaluation-harness tasks of eval.tasks where lm_eval is installed."""
    tasks = prepare_tasks(list(cfg.eval.tasks)) if cfg.eval.tasks else None
    device = pick_device()
    loaded = load_model(cfg.eval.model_path, device, inference_dtype(cfg.eval.precision, device))
    # The data the weights were trained on, where known and still there; else cfg.data (prepared,
    # or streamed: then its held-out documents, read from the source).
    if loaded.prepared_data is not None:
        store = open_split(loaded.prepared_data, "validation")  # as the trainer reads it: one source or a mixture
        where, manifest = str(loaded.prepared_data), store.manifest
        batches = validation_batches(store, cfg.data.seq_len, cfg.eval.batch_size, cfg.eval.batches)
    else:
        data = open_data(cfg.data)
        where, manifest = data.manifest.get("source", cfg.data.name), data.manifest
        batches = data.validation_batches(cfg.eval.batch_size, cfg.eval.batches)
    if manifest["tokenizer_hash"] != tokenizer_hash(loaded.tokenizer):
        raise ConfigError(
            f"the tokenizer of the model at {cfg.eval.model_path} is not the one the data in "
            f"{where} was tokenized with ({manifest['tokenizer']!r}); evaluate on data "
            "tokenized with the model's tokenizer."
        )
    started = time.perf_counter()
    loss = validation_loss(loaded.model, batches, device)
    tokens = sum(b[:, 1:].numel() for b in batches)
    result: dict[str, Any] = {
        "val_loss": loss,
        "perplexity": math.exp(loss),
        "tokens": tokens,
        "tokens_per_s": tokens / (time.perf_counter() - started),
    }
    log.info(
        "%s: held-out loss %.4f | perplexity %.2f | %d tokens | %.0f tokens/s",
        loaded.source,
        loss,
        result["perplexity"],
        tokens,
        result["tokens_per_s"],
    )
    if tasks is not None:
        result["tasks"] = run_tasks(loaded, tasks, cfg.eval.batch_size, cfg.eval.tasks_limit)
    return result


@entry_point
def main(cfg: DictConfig) -> None:
    setup_logging(0, cfg.logging.level)
    evaluate(cfg)


if __name__ == "__main__":
    main()
