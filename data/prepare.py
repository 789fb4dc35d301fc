"""Offline preparation: documents -> tokenizer -> packed token shards + manifest.json.

`python -m data.prepare [overrides]`, or called by the launcher and trainer (cached by fingerprint).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Iterable

import numpy as np
from omegaconf import DictConfig

from data.config import DataConfig
from data.corpus import describe_source, is_validation, iter_documents, source_fingerprint
from data.errors import DataError
from data.tokenizer import load_tokenizer, tokenizer_hash, train_bpe

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "validation")
_BATCH_DOCUMENTS = 256


def fingerprint(cfg: DataConfig) -> str:
    parts = [
        FORMAT_VERSION,
        source_fingerprint(cfg),
        cfg.text_field,
        cfg.validation_fraction,
        cfg.max_documents,
        cfg.tokenizer,
        cfg.tokenizer_vocab_size if cfg.tokenizer == "embedded" else None,
        cfg.shard_tokens,
    ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def prepared_dir(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() / f"{cfg.name}-{fingerprint(cfg)[:12]}"


class _ShardWriter:
    """Writes one split as shards of about shard_tokens tokens, each complete before it is named."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = self.pending_documents = 0
        self.shards: list[dict] = []

    def add(self, ids: list[int]) -> None:
        self.pending.append(np.asarray(ids, dtype=self.dtype))
        self.pending_tokens += len(ids)
        self.pending_documents += 1
        if self.pending_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        data = np.concatenate(self.pending)
        name = f"{self.split}_{len(self.shards):05d}.bin"
        tmp = self.out / (name + ".tmp")
        tmp.write_bytes(data.tobytes())
        tmp.rename(self.out / name)
        self.shards.append(
            {
                "file": name,
                "tokens": int(data.size),
                "documents": self.pending_documents,
                "sha256": hashlib.sha256(data.tobytes()).hexdigest(),
            }
        )
        self.pending, self.pending_tokens, self.pending_documents = [], 0, 0

    def summary(self) -> dict:
        return {
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": sum(s["documents"] for s in self.shards),
            "shards": self.shards,
        }


def _batched(items: Iterable, size: int) -> Iterable[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def prepare(cfg: DataConfig) -> Path:
    """Tokenize the source into cfg.cache_dir once; later calls with the same data return the cache."""
    out = prepared_dir(cfg)
    if (out / "manifest.json").exists():
        return out
    # Built under a private name and renamed at the end: an interrupted or concurrent prepare
    # never leaves a directory that looks complete.
    build = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    try:
        _build(cfg, build)
        try:
            build.rename(out)
        except OSError:
            pass  # another process finished the same preparation first; its result is identical
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return out


def _build(cfg: DataConfig, build: Path) -> None:
    log.info("preparing %s into %s", describe_source(cfg), build.parent)
    start = time.perf_counter()

    if cfg.tokenizer == "embedded":
        train_texts = (t for k, t in iter_documents(cfg) if not is_validation(k, cfg.validation_fraction))
        tokenizer = train_bpe(train_texts, cfg.tokenizer_vocab_size)
    else:
        tokenizer = load_tokenizer(cfg.tokenizer)
    tokenizer.save_pretrained(str(build / "tokenizer"))
    vocab_size = len(tokenizer)
    dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    writers = {s: _ShardWriter(build, s, dtype, cfg.shard_tokens) for s in SPLITS}

    documents = tokens = 0
    for batch in _batched(iter_documents(cfg), _BATCH_DOCUMENTS):
        encoded = tokenizer([text for _, text in batch], add_special_tokens=False, verbose=False)
        for (key, _), ids in zip(batch, encoded["input_ids"]):
            ids.append(tokenizer.eos_token_id)
            writers["validation" if is_validation(key, cfg.validation_fraction) else "train"].add(ids)
            tokens += len(ids)
        documents += len(batch)
        elapsed = time.perf_counter() - start
        log.info("prepare: %d documents, %d tokens (%.0f tokens/s)", documents, tokens, tokens / elapsed)

    for writer in writers.values():
        writer.flush()
    splits = {s: w.summary() for s, w in writers.items()}
    for split, summary in splits.items():
        if summary["tokens"] == 0:
            raise DataError(
                f"data source {describe_source(cfg)}: the {split} split is empty ({documents} "
                f"documents, data.validation_fraction={cfg.validation_fraction}); expected "
                "documents in both splits: add documents or change the fraction."
            )
    manifest = {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint(cfg),
        "source": describe_source(cfg),
        "tokenizer": cfg.tokenizer,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "vocab_size": vocab_size,
        "eos_id": tokenizer.eos_token_id,
        "dtype": dtype.name,
        "splits": splits,
    }
    (build / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log.info(
        "prepared %d documents, %d tokens in %.1fs", documents, tokens, time.perf_counter() - start
    )



def main() -> None:
    import hydra

    from launcher.cli import run_entry_point
    from launcher.config import CONF_DIR

    from trainer.log import setup_logging

    @hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        setup_logging(0, cfg.logging.level)
        run_entry_point(lambda: print(prepare(cfg.data)))

    _main()


if __name__ == "__main__":
    main()
