"""Typed config of the data pipeline."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class DataConfig:
    name: str = "embedded"
    # "embedded": the Python standard library's own source, present on every machine.
    # Otherwise a `datasets` source: a hub name, or a builder ("json", "parquet", "text")
    # reading `data_files`.
    source: str = "embedded"
    data_files: list[str] = field(default_factory=list)
    subset: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    # Share of documents held out for validation, chosen by a hash of each document's key.
    validation_fraction: float = 0.05
    max_documents: Optional[int] = None
    # "embedded": a byte-level BPE trained on the source; otherwise an AutoTokenizer name or path.
    tokenizer: str = "embedded"
    tokenizer_vocab_size: int = 4096
    seq_len: int = 128
    # Prepared shards live under cache_dir/<name>-<fingerprint>, shared by runs on the same data.
    cache_dir: str = "~/.cache/zeroforge/data"
    shard_tokens: int = 67108864
