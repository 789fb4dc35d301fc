"""Streaming mode (data.mode=stream): tokenize while training, each rank only its share, resume exactly.

Order. The source splits into P = data.stream_partitions partitions (data/partitions.py: by shard,
or by document for a one-file source), each packed into windows on its own (data/packing.py).
Global sample g is window g div P of partition g mod P, and global batch b is samples
[b*G, (b+1)*G). Partition p is read and tokenized by data-parallel rank p mod dp only, which
needs dp | P; then sample g lies on rank g mod dp, so each rank holds every dp-th row of each
global batch, G/dp rows (dp | G, as the micro-batch split already requires; G need not be a
multiple of P: a batch then takes one window more from some partitions than from others, and
the next batches even it out). The windows of batch b, and so the step's mean loss, are the same
on every world size that divides P; a rank's rows are not a contiguous slice of the batch, which
does not matter, since the loss is a mean over the whole batch. This is mosaic streaming's idea
of canonical nodes: the partition count is fixed for the run, the world size is any divisor of it.
We chose it over one global stream that every rank packs and slices (each rank tokenized
everything: one rank's tokenizer rate was the job's) and over `split_dataset_by_node` (each rank
packs its own documents, so the order changes with the world size and a resume on another one
cannot continue it).

Workers. Dataloader worker w of W takes the rank's partitions w, w + W, ... (so W <= P/dp: no
worker reads or tokenizes what another does) and yields, step after step, its partitions' rows of
the step with their row numbers in the rank's batch. torch's DataLoader hands an IterableDataset's
items back round robin (worker 0, 1, ..., W-1, 0, ...), so W items make one step, which the
training process assembles (checking that each item is the one expected). The workers are
spawned, not forked: in a process forked after the training process used the tokenizer's thread
pool (its validation windows do), the tokenizers library silently turns that pool off, and the
worker would tokenize on one core.

State. Each partition's position (data/packing.py) after the last step handed out, with
consumed_samples (which fixes how many windows partition p has given: the g < consumed_samples
with g mod P = p), the partition count and shuffle window, the fingerprint (source, text field,
split and key rules, tokenizer hash), seq_len and seed. A rank knows only its own partitions'
positions: state_dict() gives those (None for the others), and global_state() combines every
rank's into the checkpoint's (the trainer gathers them; data/ never holds a process group).
load_state_dict() takes that whole state on every rank, and each rank picks its partitions: a
resume on any world size that divides P continues exactly, and a state for another partition
count, shuffle window or data is refused naming both.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from zeroforge.data.config import DataConfig
from zeroforge.data.corpus import describe_source, source_fingerprint
from zeroforge.data.encode import DocumentEncoder, main_module_hidden, uses_bos
from zeroforge.data.errors import DataError
from zeroforge.data.loader import check_batch_split
from zeroforge.data.packing import PartitionWindows, document_start, start_position, stream_validation_batches
from zeroforge.data.partitions import PartitionDocuments, SourceLayout, check_partition_split
from zeroforge.data.tokenizer import load_tokenizer, tokenizer_hash

STREAM_FORMAT = 2


def check_streamable(cfg: DataConfig) -> None:
    if cfg.tokenizer == "embedded":
        raise DataError(
            "data.mode=stream tokenizes while training and needs a finished tokenizer; found "
            "data.tokenizer='embedded', which prepare trains on the source: set data.tokenizer to a hub "
            "name or a tokenizer directory, or use data.mode=prepared."
        )
    if cfg.mixture:
        raise DataError(
            f"data.mode=stream reads one source; found data.mixture with {len(cfg.mixture)} sources: use data.mode=prepared for mixtures."
        )


def stream_manifest(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, layout: SourceLayout) -> dict:
    """What a prepared manifest says about the data, for the checks that compare it with checkpoints.

    The partition count and shuffle window are not in the fingerprint: a state is checked against
    them by name, so that a mismatch names both numbers."""
    tok_hash = tokenizer_hash(tokenizer)
    parts = [
        "stream",
        STREAM_FORMAT,
        source_fingerprint(cfg),
        layout.shards,
        cfg.text_field,
        cfg.validation_fraction,
        cfg.max_documents,
        tok_hash,
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
    """This rank's rows of every step from first_sample on, one item per step and worker: (worker,
    step, its partitions' rows, their row numbers in the rank's batch, their positions after the
    step, as JSON text, which the DataLoader hands back from a worker as it is)."""

    def __init__(
        self,
        layout: SourceLayout,
        tokenizer: PreTrainedTokenizerBase,
        seq_len: int,
        shuffle_window: int,
        seed: int,
        positions: dict[int, dict],
        first_sample: int,
        global_batch: int,
        dp_size: int,
    ):
        super().__init__()
        self.layout, self.tokenizer, self.seq_len = layout, tokenizer, seq_len
        self.shuffle_window, self.seed, self.positions = shuffle_window, seed, positions
        self.first_sample, self.global_batch, self.dp_size = first_sample, global_batch, dp_size

    def __iter__(self) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor, str] | str]:
        try:
            yield from self._steps()
        except DataError as err:
            if get_worker_info() is None:
                raise
            # Handed back as its message: torch re-raises a worker's exception wrapped in its traceback.
            yield str(err)

    def _steps(self) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor, str]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = sorted(self.positions)[worker::workers]
        documents = PartitionDocuments(self.layout, {p: document_start(self.positions[p]) for p in mine})
        encoder = DocumentEncoder(self.tokenizer, np.dtype(np.int64))
        packers = {
            p: PartitionWindows(documents, p, encoder, self.seq_len, self.shuffle_window, self.seed, self.positions[p]) for p in mine
        }
        partitions = self.layout.partitions
        for step in itertools.count():
            start = self.first_sample + step * self.global_batch
            rows, index = [], []
            for p in mine:
                samples = range(start + (p - start) % partitions, start + self.global_batch, partitions)
                rows.append(packers[p].windows(len(samples)))
                index += [(g - start) // self.dp_size for g in samples]
            positions = json.dumps({p: packers[p].position() for p in mine})
            yield worker, step, torch.from_numpy(np.concatenate(rows)), torch.tensor(index, dtype=torch.int64), positions


class StreamLoader:
    """This rank's micro-batches of the streamed source, with BatchLoader's interface: the
    iterator starts at the first next_batch(), so a state loaded before that decides where."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: PreTrainedTokenizerBase,
        manifest: dict,
        layout: SourceLayout,
        seed: int,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        check_batch_split(global_batch, micro_batch, dp_size)
        check_partition_split(layout.partitions, dp_size, num_workers)
        self.cfg, self.tokenizer, self.manifest, self.layout, self.seed = cfg, tokenizer, manifest, layout, seed
        self.seq_len, self.shuffle_window = cfg.seq_len, cfg.stream_shuffle_window
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.consumed_samples = 0
        self.partitions = list(range(dp_rank, layout.partitions, dp_size))  # this rank's
        self.positions: dict[int, dict] = {p: start_position() for p in self.partitions}
        self._steps: Optional[Iterator[tuple[int, int, torch.Tensor, torch.Tensor, str] | str]] = None
        self._step = 0  # steps handed out by the running iterator

    def _start(self) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor, str] | str]:
        self._step = 0
        steps = _StreamSteps(
            self.layout,
            self.tokenizer,
            self.seq_len,
            self.shuffle_window,
            self.seed,
            copy.deepcopy(self.positions),
            self.consumed_samples,
            self.global_batch,
            self.dp_size,
        )
        if self.num_workers == 0:
            return iter(steps)
        loader = DataLoader(steps, batch_size=None, num_workers=self.num_workers, multiprocessing_context="spawn")
        with main_module_hidden():  # the iterator starts the workers
            return iter(loader)

    def next_batch(self) -> list[torch.Tensor]:
        """The micro-batches ([micro_batch, seq_len + 1] token ids) of this rank's next step."""
        if self._steps is None:
            self._steps = self._start()
        rows = torch.empty((self.global_batch // self.dp_size, self.seq_len + 1), dtype=torch.int64)
        for expected in range(max(self.num_workers, 1)):
            item = next(self._steps)
            if isinstance(item, str):
                raise DataError(item)
            worker, step, part, index, positions = item
            if (worker, step) != (expected, self._step):
                raise RuntimeError(
                    f"stream loader: expected step {self._step} of worker {expected}, got step {step} of worker "
                    f"{worker} (the DataLoader no longer returns its workers' items round robin)."
                )
            rows[index] = part
            self.positions.update({int(p): position for p, position in json.loads(positions).items()})
        self._step += 1
        self.consumed_samples += self.global_batch
        if self.pin_memory:
            rows = rows.pin_memory()
        return list(rows.split(self.micro_batch))

    def state_dict(self) -> dict:
        """This rank's state: the positions of its own partitions (None for the others')."""
        return {
            "consumed_samples": self.consumed_samples,
            "partitions": self.layout.partitions,
            "shuffle_window": self.shuffle_window,
            "positions": [copy.deepcopy(self.positions.get(p)) for p in range(self.layout.partitions)],
            "fingerprint": self.manifest["fingerprint"],
            "source": self.manifest["source"],
            "tokenizer_hash": self.manifest["tokenizer_hash"],
            "seq_len": self.seq_len,
            "seed": self.seed,  # the shuffle's (and a checkpoint's resume check compares it for every data mode)
        }

    @staticmethod
    def global_state(states: list[dict]) -> dict:
        """The state of the whole job from every rank's state_dict(): every partition's position."""
        merged = copy.deepcopy(states[0])
        for state in states[1:]:
            for p, position in enumerate(state["positions"]):
                if position is not None:
                    merged["positions"][p] = position
        return merged

    def mixture_shares(self) -> dict[str, float]:
        """A stream reads one source (data.mixture needs prepared data): no shares to report."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Continue from the job's state (global_state()), on any world size that divides the
        partition count; refuses one saved for another partition count, shuffle or data."""
        now = self.state_dict()
        keys = ("partitions", "shuffle_window", "source", "tokenizer_hash", "seq_len", "seed", "fingerprint")
        names = {"partitions": "data.stream_partitions", "shuffle_window": "data.stream_shuffle_window"}
        differs = [f"{names.get(key, key)}: saved {state.get(key)!r}, now {now[key]!r}" for key in keys if state.get(key) != now[key]]
        if differs:
            raise DataError("the saved data state belongs to other data or another order; " + "; ".join(differs) + ".")
        missing = [p for p in self.partitions if state["positions"][p] is None]
        if missing:
            raise DataError(
                f"the saved data state has no position for partition(s) {missing} of rank {self.dp_rank}: it is "
                "one rank's state_dict(), expected the job's (StreamLoader.global_state of every rank's)."
            )
        self.consumed_samples = int(state["consumed_samples"])
        self.positions = {p: copy.deepcopy(state["positions"][p]) for p in self.partitions}
        self._steps = None  # a running iterator (and its workers) is at the old position


class StreamData:
    """The training data of data.mode=stream: no prepared directory, the tokenizer by name."""

    prepared = None

    def __init__(self, cfg: DataConfig):
        check_streamable(cfg)
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.layout = SourceLayout(cfg)
        self.manifest = stream_manifest(cfg, self.tokenizer, self.layout)

    def loader(self, seed: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int, pin_memory: bool = False) -> StreamLoader:
        return StreamLoader(
            self.cfg,
            self.tokenizer,
            self.manifest,
            self.layout,
            seed,
            global_batch,
            micro_batch,
            dp_rank,
            dp_size,
            self.cfg.num_workers,
            pin_memory,
        )

    def validation_batches(self, batch_size: int, num_batches: int) -> list[torch.Tensor]:
        return stream_validation_batches(self.layout, self.tokenizer, self.cfg.seq_len, batch_size, num_batches)
