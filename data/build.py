"""The training data for data.mode: prepared shards or a streamed source, behind one interface.

Either gives the tokenizer, a manifest (fingerprint, tokenizer hash, vocabulary size: what
checkpoints and init_from are checked against), the prepared directory (None when streaming),
a loader with next_batch(), state_dict(), global_state(), load_state_dict() and
mixture_shares(), and fixed validation batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch

from zeroforge.data.config import DataConfig
from zeroforge.data.errors import DataError
from zeroforge.data.loader import BatchLoader, validation_batches
from zeroforge.data.mixture import open_split
from zeroforge.data.prepare import prepare, prepared_dir
from zeroforge.data.shards import is_prepared, load_manifest
from zeroforge.data.stream import StreamData
from zeroforge.data.tokenizer import load_tokenizer

MODES = ("prepared", "stream")


class PreparedData:
    """The training data of data.mode=prepared: shards prepared once into data.cache_dir."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.prepared: Path = prepare(cfg)
        self.tokenizer = load_tokenizer(self.prepared / "tokenizer")
        # Both splits opened now, so that a missing or truncated shard of either stops the start.
        self.train = open_split(self.prepared, "train")  # one source, or a weighted mixture
        self.validation = open_split(self.prepared, "validation")
        self.manifest = self.train.manifest

    def loader(self, seed: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int, pin_memory: bool = False) -> BatchLoader:
        return BatchLoader(
            self.train,
            self.cfg.seq_len,
            seed,
            global_batch,
            micro_batch,
            dp_rank=dp_rank,
            dp_size=dp_size,
            num_workers=self.cfg.num_workers,
            pin_memory=pin_memory,
        )

    def validation_batches(self, batch_size: int, num_batches: int) -> list[torch.Tensor]:
        return validation_batches(self.validation, self.cfg.seq_len, batch_size, num_batches)


def open_data(cfg: DataConfig) -> Union[PreparedData, StreamData]:
    """Prepares (or finds) the data, or opens the stream's tokenizer, by data.mode."""
    if cfg.mode == "prepared":
        return PreparedData(cfg)
    if cfg.mode == "stream":
        return StreamData(cfg)
    raise DataError(f"data.mode={cfg.mode!r}: expected one of {list(MODES)}.")


def prepared_manifest(cfg: DataConfig) -> Optional[dict[str, Any]]:
    """The manifest of data already prepared (as a resumed run's is), read without preparing;
    None for data not prepared yet, or streamed; a DataError for a damaged preparation, found
    before a job is queued."""
    if cfg.mode != "prepared":
        return None
    directory = prepared_dir(cfg)
    return load_manifest(directory) if is_prepared(directory) else None


def resume_problems(saved: dict[str, Any], manifest: dict[str, Any], cfg: DataConfig, seed: int) -> list[str]:
    """How a loader's saved global_state() differs from what this run's data gives in the same
    order (the data itself, seq_len, the seed, a stream's partitions and shuffle): a checkpoint
    whose data state differs cannot continue the run. Checked before any rank starts, and by the
    trainer before it loads a checkpoint."""
    problems = []
    if saved["fingerprint"] != manifest["fingerprint"]:
        problems.append(f"data fingerprint: checkpoint {saved['fingerprint'][:12]}, now {manifest['fingerprint'][:12]}")
    if saved["seq_len"] != cfg.seq_len:
        problems.append(f"data.seq_len: checkpoint {saved['seq_len']}, now {cfg.seq_len}")
    if saved["seed"] != seed:
        problems.append(f"seed (the data order): checkpoint {saved['seed']}, now {seed}")
    if "partitions" in saved:  # a streamed run's order: its partitions and shuffle
        for key, name in (("partitions", "stream_partitions"), ("shuffle_window", "stream_shuffle_window")):
            if saved[key] != getattr(cfg, name):
                problems.append(f"data.{name}: checkpoint {saved[key]}, now {getattr(cfg, name)}")
    return problems
