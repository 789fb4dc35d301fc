"""Read-only access to prepared token shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from zeroforge.data.errors import DataError


def load_manifest(prepared: Path) -> dict:
    path = Path(prepared) / "manifest.json"
    if not path.exists():
        raise DataError(f"no manifest.json in {prepared}; expected a directory made by zeroforge prepare.")
    return json.loads(path.read_text())


class TokenStore:
    """One split's shards as a single token sequence, memory-mapped."""

    def __init__(self, prepared: Path, split: str):
        self.prepared, self.split = Path(prepared), split
        self.manifest = load_manifest(prepared)
        dtype = np.dtype(self.manifest["dtype"])
        self.shards: list[np.ndarray] = []
        for shard in self.manifest["splits"][split]["shards"]:
            path = Path(prepared) / shard["file"]
            expected = shard["tokens"] * dtype.itemsize
            found = path.stat().st_size if path.exists() else None
            if found != expected:
                raise DataError(
                    f"shard {path}: expected {expected} bytes ({shard['tokens']} tokens) as the "
                    f"manifest says, found {found if found is not None else 'no file'}."
                )
            self.shards.append(np.memmap(path, dtype=dtype, mode="r"))
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])

    def __reduce__(self):
        # Dataloader workers started by spawn reopen the files instead of copying their tokens.
        return TokenStore, (self.prepared, self.split)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length), across shard boundaries."""
        out = []
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while length > 0:
            lo = start - int(self.starts[i])
            piece = self.shards[i][lo : lo + length]
            out.append(piece)
            start += len(piece)
            length -= len(piece)
            i += 1
        return np.concatenate(out) if len(out) > 1 else np.asarray(out[0])
