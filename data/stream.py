"""Streaming mode (data.mode=stream): tokenize on the fly, pack, and resume exactly.

Sharding: one deterministic global stream of packed windows, as data/packing.py builds it from the
source in its own order (no shuffle: a shuffle buffer's contents cannot be restored). Global batch
b is windows [b*G, (b+1)*G) and data-parallel rank r keeps the r-th contiguous slice of it, so
batch b holds the same windows for every world size that divides G, and a resume on another world
size continues the same sequence. The price: every rank reads and tokenizes the whole source and
keeps 1/dp of it. We chose this over `datasets.distributed.split_dataset_by_node`, which gives
each rank its own documents and so packs them differently for every world size: exactness over
read efficiency. Dataloader worker w of W builds the steps w, w+W, ... (so none twice), each
reading and tokenizing the whole source too (packing needs every document's length): one worker
takes tokenizing off the training process, more only cost CPU. The workers are spawned, not
forked: in a process forked after the training process used the tokenizer's thread pool (its
validation windows do), the tokenizers library silently turns that pool off, and the worker
would tokenize on one core. Where tokenizing the source on every rank is too slow, prepare it
(data.mode=prepared).

State: {consumed_samples, position}, where position is the stream's (epoch, source position in
front of the document holding the next window's first token, offset in that document). Every
rank packs the whole global batch, so the position after a step is the same on every rank and
world size. It comes with the fingerprint (source, text field, split rule, tokenizer hash) and
seq_len, and a state for other data is refused naming both.
"""
from __future__ import annotations

import copy
import hashlib
import json
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from zeroforge.data.config import DataConfig
from zeroforge.data.corpus import describe_source, source_fingerprint
from zeroforge.data.encode import main_module_hidden, uses_bos
from zeroforge.data.errors import DataError
from zeroforge.data.loader import check_batch_split
from zeroforge.data.packing import PackedStream, stream_validation_batches
from zeroforge.data.tokenizer import load_tokenizer, tokenizer_hash

STREAM_FORMAT = 1


def check_streamable(cfg: DataConfig) -> None:
    if cfg.tokenizer == "embedded":
        raise DataError(
            "data.mode=stream tokenizes while training and needs a finished tokenizer; found "
            "data.tokenizer='embedded', which prepare trains on the source: set data.tokenizer to a hub "
            "name or a tokenizer directory, or use data.mode=prepared."
        )
    if cfg.mixture:
        raise DataError(
            f"data.mode=stream reads one source; found data.mixture with {len(cfg.mixture)} sources: "
            "use data.mode=prepared for mixtures."
        )


def stream_manifest(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> dict:
    """What a prepared manifest says about the data, for the checks that compare it with checkpoints."""
    tok_hash = tokenizer_hash(tokenizer)
    parts = [
        "stream", STREAM_FORMAT, source_fingerprint(cfg), cfg.text_field, cfg.validation_fraction,
        cfg.max_documents, tok_hash,
    ]
    return {
        "fingerprint": hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest(),
        "source": describe_source(cfg),
        "tokenizer": cfg.tokenizer,
        "tokenizer_hash": tok_hash,
        "vocab_size": len(tokenizer),
        "eos_id": tokenizer.eos_token_id,
        "bos_id": tokenizer.bos_token_id if uses_bos(tokenizer) else None,
    }


class _StreamSteps(IterableDataset):
    """This rank's rows of every step from `position` on, each with the position after that step;
    worker w of W yields steps w::W."""

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, position: Optional[dict],
                 global_batch: int, dp_rank: int, dp_size: int):
        super().__init__()
        self.cfg, self.tokenizer, self.position = cfg, tokenizer, position
        self.global_batch, self.per_rank = global_batch, global_batch // dp_size
        self.offset = dp_rank * self.per_rank

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = PackedStream(self.cfg, self.tokenizer, "train", self.cfg.seq_len, self.position)
        stream.skip(worker * self.global_batch)
        while True:
            stream.skip(self.offset)
            rows = torch.from_numpy(stream.windows(self.per_rank))
            stream.skip(self.global_batch - self.offset - self.per_rank)
            # As text: the DataLoader hands it back from a worker as it is.
            yield rows, json.dumps(stream.position())
            stream.skip((workers - 1) * self.global_batch)


class StreamLoader:
    """This rank's micro-batches of the streamed source, with BatchLoader's interface: the
    iterator starts at the first next_batch(), so a state loaded before that decides where."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: PreTrainedTokenizerBase,
        manifest: dict,
        seed: int,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        check_batch_split(global_batch, micro_batch, dp_size)
        self.cfg, self.tokenizer, self.manifest, self.seed = cfg, tokenizer, manifest, seed
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.consumed_samples = 0
        self.position: Optional[dict] = None  # None: the start of the source
        self._steps: Optional[Iterator[tuple[torch.Tensor, str]]] = None

    def _start(self) -> Iterator[tuple[torch.Tensor, str]]:
        steps = _StreamSteps(self.cfg, self.tokenizer, self.position, self.global_batch, self.dp_rank, self.dp_size)
        if self.num_workers == 0:
            return iter(steps)
        loader = DataLoader(steps, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            multiprocessing_context="spawn")
        with main_module_hidden():  # the iterator starts the workers
            return iter(loader)

    def next_batch(self) -> list[torch.Tensor]:
        """The micro-batches ([micro_batch, seq_len + 1] token ids) of this rank's next step."""
        if self._steps is None:
            self._steps = self._start()
        rows, position = next(self._steps)
        self.position = json.loads(position)
        self.consumed_samples += self.global_batch
        return list(rows.split(self.micro_batch))

    def state_dict(self) -> dict:
        return {
            "consumed_samples": self.consumed_samples,
            "position": copy.deepcopy(self.position),
            "fingerprint": self.manifest["fingerprint"],
            "source": self.manifest["source"],
            "tokenizer_hash": self.manifest["tokenizer_hash"],
            "seq_len": self.cfg.seq_len,
            # Streamed order does not depend on the seed; it is here because a checkpoint's
            # resume check (trainer/checkpoint.py) compares it for every data mode.
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved state; refuses one saved for another source, tokenizer or seq_len."""
        now = self.state_dict()
        keys = ("source", "tokenizer_hash", "seq_len", "fingerprint")
        differs = [f"{key}: saved {state.get(key)!r}, now {now[key]!r}" for key in keys if state.get(key) != now[key]]
        if differs:
            raise DataError("the saved data state belongs to other data; " + "; ".join(differs) + ".")
        self.consumed_samples = int(state["consumed_samples"])
        self.position = copy.deepcopy(state["position"])
        self._steps = None  # a running iterator (and its workers) is at the old position


class StreamData:
    """The training data of data.mode=stream: no prepared directory, the tokenizer by name."""

    prepared = None

    def __init__(self, cfg: DataConfig):
        check_streamable(cfg)
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.manifest = stream_manifest(cfg, self.tokenizer)

    def loader(self, seed: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
               pin_memory: bool = False) -> StreamLoader:
        return StreamLoader(self.cfg, self.tokenizer, self.manifest, seed, global_batch, micro_batch, dp_rank,
                            dp_size, self.cfg.num_workers, pin_memory)

    def validation_batches(self, batch_size: int, num_batches: int) -> list[torch.Tensor]:
        return stream_validation_batches(self.cfg, self.tokenizer, self.cfg.seq_len, batch_size, num_batches)
