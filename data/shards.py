"""Read-only access to prepared token shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from zeroforge.data.errors import DataError


def is_prepared(prepared: Path) -> bool:
    """Whether `prepared` holds a finished preparation (False: nothing is there yet).

    A prepare writes manifest.json last, then gives its directory the final name in one rename, so
    a non-empty directory of that name without a manifest was damaged or changed from outside (a
    deleted manifest, an unfinished copy). It is refused rather than prepared over, which would mix
    new shards with its files or move away files a user may need.
    """
    prepared = Path(prepared)
    if (prepared / "manifest.json").exists():
        return True
    if not prepared.exists():
        return False
    if prepared.is_dir():
        entries = sorted(p.name for p in prepared.iterdir())
        if not entries:
            return False
        found = f"{len(entries)} entries ({', '.join(entries[:4])}{', ...' if len(entries) > 4 else ''})"
    else:
        found = "a file"
    raise DataError(
        f"{prepared} has no manifest.json, which a finished zeroforge prepare writes last; found {found}: "
        "a damaged preparation or an unfinished copy, which is neither used nor prepared over. Finish the "
        f"copy, or move it aside (mv {prepared} {prepared}.damaged) to prepare the data again."
    )


def load_manifest(prepared: Path) -> dict:
    if not is_prepared(prepared):
        raise DataError(f"no manifest.json in {prepared}; expected a directory made by zeroforge prepare.")
    return json.loads((Path(prepared) / "manifest.json").read_text())


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
                    f"manifest says, found {found if found is not None else 'no file'}: {prepared} is damaged; "
                    "move it aside to prepare the data again."
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
