"""Packing one partition of a streamed source into windows, with a position that resumes exactly.

A partition's token stream is its train documents (each [BOS] + tokens + EOS, as prepare writes
them) back to back, epoch after epoch; its window m is tokens [m*seq_len, m*seq_len + seq_len + 1),
the same concat-and-chunk as prepared shards. With data.stream_shuffle_window=S > 0 the documents
go in blocks of S (the partition's documents in read order, counted from each epoch's start; an
epoch's last block may be shorter), each block in the order of a permutation seeded by (seed,
partition, epoch, block number); S = 0 keeps read order (blocks of one).

The position in that stream is where the next window starts: the place in front of the first
document of the block holding that token (data/partitions.py), its epoch and block number, the
document's index in the permuted block, and how many of its tokens lie before the position. On
resume the block's documents are read again from its first (at most S texts), permuted again,
and only the document holding the position is tokenized again, so the position stays small
whatever the documents' length.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from zeroforge.data.corpus import describe_source
from zeroforge.data.encode import DocumentEncoder
from zeroforge.data.errors import DataError
from zeroforge.data.partitions import PartitionDocuments, SourceLayout, validation_documents

# Documents tokenized per batch, up to a size: the fast tokenizer's batch encoder amortises its
# overhead over them, while the read-ahead stays small (a rank may hold 64 partitions' buffers).
_BATCH_DOCUMENTS = 64
_BATCH_CHARACTERS = 1 << 16


def start_position() -> dict:
    """A partition's position before its first window."""
    return {"epoch": 0, "place": None, "block": 0, "index": 0, "offset": 0}


def document_start(position: dict) -> tuple[int, Optional[dict]]:
    """Where a partition's documents must be read from to continue at `position`: its block's first."""
    return position["epoch"], position["place"]


@dataclass
class _Block:
    epoch: int
    place: Optional[dict]  # in front of its first document
    number: int  # within its epoch


@dataclass
class _Tokens:
    block: _Block
    index: int  # in the permuted block
    tokens: np.ndarray
    offset: int = 0  # tokens already behind the stream position


class PartitionWindows:
    """Windows of seq_len + 1 tokens of one partition's train documents, from `position` on."""

    def __init__(
        self,
        documents: PartitionDocuments,
        partition: int,
        encoder: DocumentEncoder,
        seq_len: int,
        shuffle_window: int,
        seed: int,
        position: dict,
    ):
        self.documents, self.partition, self.encoder = documents, partition, encoder
        self.seq_len, self.block_size, self.seed = seq_len, max(shuffle_window, 1), seed
        self.next_block = _Block(position["epoch"], position["place"], position["block"])
        self.pending: collections.deque[tuple[_Block, int, str]] = collections.deque()  # to tokenize, in order
        self._add_block()
        for _ in range(position["index"]):  # the block's documents before the position's: used up
            self.pending.popleft()
        self.skip_first = position["offset"]  # the resumed document's tokens before the position
        self.buffer: collections.deque[_Tokens] = collections.deque()
        self.buffered = 0

    def position(self) -> dict:
        """Where the next window starts; a PartitionWindows built with it continues there."""
        if not self.buffer:
            self._fill()
        head = self.buffer[0]
        return {
            "epoch": head.block.epoch,
            "place": head.block.place,
            "block": head.block.number,
            "index": head.index,
            "offset": head.offset,
        }

    def windows(self, count: int) -> np.ndarray:
        """The next `count` windows, [count, seq_len + 1], and moves past them."""
        if count == 0:
            return np.empty((0, self.seq_len + 1), dtype=np.int64)
        flat = self._peek(count * self.seq_len + 1)
        rows = np.lib.stride_tricks.sliding_window_view(flat, self.seq_len + 1)[:: self.seq_len]
        self._skip(count * self.seq_len)
        return rows.copy()  # a writable array of its own: the view is read-only (and torch warns)

    def _skip(self, left: int) -> None:
        while left:
            if not self.buffer:
                self._fill()
            head = self.buffer[0]
            step = min(left, len(head.tokens) - head.offset)
            head.offset += step
            self.buffered -= step
            left -= step
            if head.offset == len(head.tokens):
                self.buffer.popleft()

    def _peek(self, length: int) -> np.ndarray:
        while self.buffered < length:
            self._fill()
        pieces, need = [], length
        for doc in self.buffer:
            piece = doc.tokens[doc.offset : doc.offset + need]
            pieces.append(piece)
            need -= len(piece)
            if not need:
                break
        return np.concatenate(pieces)

    def _add_block(self) -> None:
        """Reads the next block's documents into `pending`, in the block's order."""
        block = self.next_block
        texts = [self.documents.pop(self.partition).text]
        while len(texts) < self.block_size and self.documents.peek(self.partition).epoch == block.epoch:
            texts.append(self.documents.pop(self.partition).text)
        order = range(len(texts))
        if self.block_size > 1:
            rng = np.random.Generator(np.random.PCG64([self.seed, self.partition, block.epoch, block.number]))
            order = rng.permutation(len(texts)).tolist()
        self.pending.extend((block, index, texts[i]) for index, i in enumerate(order))
        following = self.documents.peek(self.partition)
        number = block.number + 1 if following.epoch == block.epoch else 0
        self.next_block = _Block(following.epoch, following.place, number)

    def _fill(self) -> None:
        """Tokenizes the next documents into the buffer."""
        batch: list = []
        size = 0
        while len(batch) < _BATCH_DOCUMENTS and size < _BATCH_CHARACTERS:
            if not self.pending:
                self._add_block()
            batch.append(self.pending.popleft())
            size += len(batch[-1][2])
        tokens, lengths = self.encoder([text for _, _, text in batch])
        for (block, index, _), piece in zip(batch, np.split(tokens, np.cumsum(lengths)[:-1])):
            self.buffer.append(_Tokens(block, index, piece, offset=self.skip_first))
            self.buffered += len(piece) - self.skip_first
            self.skip_first = 0


def stream_validation_batches(
    layout: SourceLayout, tokenizer: PreTrainedTokenizerBase, seq_len: int, batch_size: int, num_batches: int
) -> list[torch.Tensor]:
    """The first windows of the held-out documents, in source order: the same numbers on every run
    and world size.

    The source is read from its start until there are enough (or it ends): held-out documents
    are chosen by the same hash of the same keys as the training documents are read with.
    """
    encoder = DocumentEncoder(tokenizer, np.dtype(np.int64))
    wanted = batch_size * num_batches * seq_len + 1
    pieces, have = [np.empty(0, dtype=np.int64)], 0
    for texts in _batches(validation_documents(layout), _BATCH_DOCUMENTS):
        tokens, _ = encoder(texts)
        pieces.append(tokens)
        have += len(tokens)
        if have >= wanted:
            break
    count = min(batch_size * num_batches, (have - 1) // seq_len)
    if count < 1:
        raise DataError(
            f"data source {describe_source(layout.cfg)}: its validation documents have {have} tokens, "
            f"fewer than one sample of data.seq_len + 1 = {seq_len + 1}; use more data or a larger "
            "data.validation_fraction."
        )
    flat = np.concatenate(pieces)[: count * seq_len + 1]
    rows = np.lib.stride_tricks.sliding_window_view(flat, seq_len + 1)[::seq_len].copy()
    return list(torch.from_numpy(rows).split(batch_size))


def _batches(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
