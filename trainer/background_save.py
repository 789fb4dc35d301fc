"""Asynchronous saves (checkpoint.async_save): DeepSpeed's writes move to a thread.

DeepSpeed hands every file of a checkpoint to its checkpoint engine's save(). This engine copies
the state to host memory (the snapshot, the only part the training loop waits for) and writes it
from a background thread while training goes on. The commit (checksums, manifest, rename,
`latest`) still happens on the main thread, after the writes finished: trainer/checkpoint.py
does it at the next step boundary, so a checkpoint is never visible before it is complete.
"""

from __future__ import annotations

import copy
import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine


def file_entry(path: Path) -> dict[str, Any]:
    """A file's manifest entry ({bytes, sha256}), after it is synced to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        digest = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def snapshot(obj: Any) -> Any:
    """A copy that training cannot change any more: tensors copied to host memory, the rest deep-copied."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, snapshot(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(snapshot(v) for v in obj)
    return copy.deepcopy(obj)


class BackgroundWriter(TorchCheckpointEngine):
    def __init__(self, zipfile_serialization: bool):
        super().__init__(None)
        self.zipfile_serialization = zipfile_serialization
        # One thread: files are written in the order DeepSpeed produced them, one at a time.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zeroforge-save")
        self._pending: list[Future] = []

    def save(self, state_dict: Any, path: str) -> None:
        state = snapshot(state_dict)
        self._pending.append(self._pool.submit(self._write, state, Path(path)))

    def _write(self, state: Any, path: Path) -> tuple[Path, dict[str, Any]]:
        torch.save(state, path, _use_new_zipfile_serialization=self.zipfile_serialization)
        # Synced and hashed here too, so that the commit on the main thread only gathers entries.
        return path, file_entry(path)

    def wait(self) -> tuple[dict[Path, dict[str, Any]], Optional[str]]:
        """Block until every file handed over so far is written: their manifest entries, and why
        not, if one failed."""
        entries, problems = {}, []
        for future in self._pending:
            try:
                path, entry = future.result()
                entries[path] = entry
            except Exception as err:  # a full disk or a lost mount: reported, then agreed on by all ranks
                problems.append(repr(err))
        self._pending = []
        return entries, "; ".join(problems) or None
