"""The partitions of a streamed source, and each partition's documents, from a place that can be saved.

Layout. The source splits into P = data.stream_partitions partitions. A source with at least P
shards (the files of data.data_files, a hub dataset's files, as `datasets` counts them in
IterableDataset.num_shards, or the embedded corpus's files) is partitioned by shard: partition p
reads shards p, p + P, p + 2P, ... in that order, and nothing else. A source of one shard (one
file) is partitioned by document: a document goes to partition blake2b(key) mod P, so a reader
reads every row of the source but hands on (and so tokenizes) only its own partitions' documents;
by hash, not round robin, so that a source whose long documents come every P-th row does not put
them all in one partition. A source of 2..P-1 shards is refused (a smaller data.stream_partitions
fits it), as is data.max_documents with shards (the source's first documents are not known to a
reader of some of its shards).

Keys. A document's key, which the validation split hashes (corpus.is_validation) and document
partitioning too, is its row number within its shard, prefixed with the shard number where the
source has several ("3:1041"); for a one-file source that is its row number, the key prepare uses,
and the embedded corpus's keys are its file names, as in prepare. Training and validation read the
same keys, so the splits never overlap. (prepare numbers a multi-file source's rows across files,
so there the stream holds out other documents than prepare; the two modes never mix data.)

Places. Where a reader is: {"shard": k (the k-th of its shards), "row": r (rows of that shard before
it), "documents": d (documents read before it, for max_documents), "dataset": the `datasets` state
in front of the batch of rows holding row r (None: the shard's start), "skip": rows of that batch
before r}. A reader built with it reads on exactly there, and reopens the shard at its batch
through datasets' own state (which skips the files and row groups in front) instead of reading
every row before it. Rows are read _ROWS_PER_READ at a time, and one state is kept per batch.
"""

from __future__ import annotations

import collections
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from zeroforge.data.config import DataConfig
from zeroforge.data.corpus import (
    dataset_batches,
    describe_source,
    embedded_files,
    is_validation,
    open_dataset,
    row_text,
)
from zeroforge.data.errors import DataError

# Rows per read from a `datasets` shard: about the documents of one tokenizer batch.
_ROWS_PER_READ = 64


def document_partition(key: str, partitions: int) -> int:
    """The partition of a document of a one-shard source (not the validation hash: a personalised one)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8, person=b"partition").digest()
    return int.from_bytes(digest, "little") % partitions


def check_partition_split(partitions: int, dp_size: int, num_workers: int) -> None:
    """Every rank owns whole partitions, and each of its dataloader workers at least one of them."""
    if partitions < 1 or partitions % dp_size:
        raise DataError(
            f"data.stream_partitions={partitions} must be a multiple of the data-parallel size {dp_size} "
            f"(partition p is read by rank p mod {dp_size}); for example data.stream_partitions="
            f"{max(dp_size, partitions // dp_size * dp_size)}."
        )
    per_rank = partitions // dp_size
    if num_workers > per_rank:
        raise DataError(
            f"data.num_workers={num_workers}: a rank's workers split its {per_rank} partitions "
            f"(data.stream_partitions={partitions} / data-parallel size {dp_size}); expected at most "
            f"{per_rank} workers."
        )


class SourceLayout:
    """How the source splits into partitions: its shard count, found once (in the training process)
    and carried to dataloader workers with the layout."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.partitions: int = cfg.stream_partitions
        self.embedded = cfg.source == "embedded"
        self._files: Optional[list[Path]] = None
        self._dataset = None  # the opened source, per process: a worker opens its own
        self.shards: int = len(self._embedded()) if self.embedded else self._opened().num_shards
        self.by_document = self.shards == 1
        described = f"data source {describe_source(cfg)} has {self.shards} shards (files)"
        if 1 < self.shards < self.partitions:
            raise DataError(
                f"{described}, fewer than data.stream_partitions={self.partitions}: a partition is "
                f"a set of whole shards, so expected at most {self.shards} partitions; set "
                f"data.stream_partitions to at most {self.shards} (a multiple of the data-parallel "
                "size), or give the source more files."
            )
        if cfg.max_documents is not None and not self.by_document:
            raise DataError(
                f"data.max_documents={cfg.max_documents} with data.mode=stream: {described}, and a "
                "partition reads only its own, so the source's first documents are not known to it; "
                "select files through data.data_files, or use data.mode=prepared."
            )

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_dataset"] = None  # reopened where it is used
        return state

    def shards_of(self, partition: int) -> list[int]:
        """The shards a reader of this partition reads (all: one, when partitioned by document)."""
        return [0] if self.by_document else list(range(partition, self.shards, self.partitions))

    def partition_of(self, key: str, shard: int) -> int:
        return document_partition(key, self.partitions) if self.by_document else shard % self.partitions

    def key(self, shard: int, row: int) -> str:
        if self.embedded:
            return str(self._embedded()[shard].relative_to(sysconfig.get_paths()["stdlib"]))
        return str(row) if self.shards == 1 else f"{shard}:{row}"

    def _embedded(self) -> list[Path]:
        if self._files is None:
            self._files = embedded_files()
        return self._files

    def _opened(self):
        if self._dataset is None:
            self._dataset = open_dataset(self.cfg)
        return self._dataset

    def rows(self, shards: list[int], place: Optional[dict] = None) -> Iterator[tuple[dict, str, str]]:
        """(place in front of it, key, text) of the documents (non-empty rows) of `shards`, in that
        order, from `place` on (None: the first shard's start)."""
        place = place or {"shard": 0, "row": 0, "documents": 0, "dataset": None, "skip": 0}
        documents, cap = place["documents"], self.cfg.max_documents
        field = self.cfg.text_field  # read once: an OmegaConf read per row costs as much as a small document
        for k in range(place["shard"], len(shards)):
            shard = shards[k]
            resumed = k == place["shard"]
            if self.embedded:  # a file is a shard of one row
                text = self._embedded()[shard].read_text(encoding="utf-8", errors="replace")
                if text.strip():
                    if cap is not None and documents >= cap:
                        return
                    yield {"shard": k, "row": 0, "documents": documents, "dataset": None, "skip": 0}, self.key(shard, 0), text
                    documents += 1
                continue
            dataset = self._opened().shard(num_shards=self.shards, index=shard, contiguous=True)
            state, skip = (place["dataset"], place["skip"]) if resumed else (None, 0)
            if state is not None:
                dataset.load_state_dict(state)
            row = place["row"] - skip if resumed else 0  # the first row of the first batch read
            for batch in dataset_batches(self.cfg, dataset, _ROWS_PER_READ):
                columns = list(batch.items())
                for i in range(skip, len(columns[0][1])):
                    key = self.key(shard, row + i)
                    text = row_text(self.cfg, {name: values[i] for name, values in columns}, field, key)
                    if text.strip():
                        if cap is not None and documents >= cap:
                            return
                        yield {"shard": k, "row": row + i, "documents": documents, "dataset": state, "skip": i}, key, text
                        documents += 1
                row += len(columns[0][1])
                state, skip = dataset.state_dict(), 0


@dataclass
class Document:
    epoch: int
    place: dict  # where the reader was in front of it
    text: str


def _order(epoch: int, place: Optional[dict]) -> tuple[int, int, int]:
    return (epoch, place["shard"], place["row"]) if place else (epoch, 0, 0)


class _Feed:
    """One reader over some shards, handing each train document to its partition's queue, epoch
    after epoch. It starts at the earliest of its partitions' starts; a partition takes nothing
    from in front of its own."""

    def __init__(
        self, layout: SourceLayout, shards: list[int], queues: dict[int, collections.deque], starts: dict[int, tuple[int, Optional[dict]]]
    ):
        self.layout, self.shards, self.queues = layout, shards, queues
        self.starts = {p: _order(*starts[p]) for p in queues}
        self.epoch, place = min((starts[p] for p in queues), key=lambda start: _order(*start))
        self.rows = layout.rows(shards, place)
        self.from_start = place is None
        self.fraction = layout.cfg.validation_fraction
        self.fed: set[int] = set()  # partitions given a document in this epoch

    def read(self) -> None:
        """Hands on the documents of the next _ROWS_PER_READ rows (from the next epoch at the end)."""
        for _ in range(_ROWS_PER_READ):
            item = next(self.rows, None)
            if item is None:
                self._next_epoch()
                continue
            place, key, text = item
            if is_validation(key, self.fraction):
                continue
            p = self.layout.partition_of(key, self.shards[place["shard"]])
            if p in self.queues and (self.epoch, place["shard"], place["row"]) >= self.starts[p]:
                self.queues[p].append(Document(self.epoch, place, text))
                self.fed.add(p)

    def _next_epoch(self) -> None:
        empty = sorted(set(self.queues) - self.fed)
        if self.from_start and empty:
            layout = self.layout
            how = "by document" if layout.by_document else f"shards {self.shards}"
            raise DataError(
                f"data source {describe_source(layout.cfg)}: partition {empty[0]} of data.stream_partitions="
                f"{layout.partitions} ({how}) has no train documents (data.validation_fraction="
                f"{self.fraction}); expected at least one: use fewer partitions or more data."
            )
        self.epoch += 1
        self.rows = self.layout.rows(self.shards)
        self.from_start, self.fed = True, set()


class PartitionDocuments:
    """The train documents of some partitions (those of one dataloader worker of one rank), each
    partition's in its own order, epoch after epoch, each from its own start.

    By shard, each partition has its own reader. By document, one reader serves them all, so the
    documents read ahead for the partitions that lag wait in their queues (a random walk of a few
    documents as the partitions' windows take turns, more over epochs where partitions differ in size).
    """

    def __init__(self, layout: SourceLayout, starts: dict[int, tuple[int, Optional[dict]]]):
        """starts: partition -> (epoch, place of its first document, or None: the source's start)."""
        self.queues: dict[int, collections.deque[Document]] = {p: collections.deque() for p in starts}
        if layout.by_document:
            feed = _Feed(layout, [0], self.queues, starts)
            self.feeds = {p: feed for p in starts}
        else:
            self.feeds = {p: _Feed(layout, layout.shards_of(p), {p: self.queues[p]}, starts) for p in starts}

    def peek(self, partition: int) -> Document:
        queue = self.queues[partition]
        while not queue:
            self.feeds[partition].read()
        return queue[0]

    def pop(self, partition: int) -> Document:
        document = self.peek(partition)
        self.queues[partition].popleft()
        return document


def validation_documents(layout: SourceLayout) -> Iterator[str]:
    """The held-out documents' texts, in source order (every shard, first to last), one epoch."""
    fraction = layout.cfg.validation_fraction
    for _, key, text in layout.rows(list(range(layout.shards))):
        if is_validation(key, fraction):
            yield text
