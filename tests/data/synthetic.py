"""Prepared directories built by hand: token t of a split is t itself, so every row names its window."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from zeroforge.data.shards import TokenStore


def counting_store(
    path: Path, num_tokens: int, shard_tokens: int = 1000, fingerprint: str = "f" * 64, tokenizer_hash: str = "t" * 16
) -> TokenStore:
    """A train split whose tokens are 0, 1, 2, ... in shards of shard_tokens (uint32)."""
    path.mkdir(parents=True, exist_ok=True)
    tokens = np.arange(num_tokens, dtype=np.uint32)
    shards = []
    for i, start in enumerate(range(0, num_tokens, shard_tokens)):
        name = f"train_{i:05d}.bin"
        piece = tokens[start : start + shard_tokens]
        piece.tofile(path / name)
        shards.append({"file": name, "tokens": int(piece.size), "documents": 1})
    manifest = {
        "fingerprint": fingerprint,
        "tokenizer_hash": tokenizer_hash,
        "vocab_size": 2**32 - 1,
        "eos_id": 0,
        "dtype": "uint32",
        "splits": {"train": {"tokens": num_tokens, "documents": len(shards), "shards": shards}},
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return TokenStore(path, "train")
