"""Packing a streamed source into windows, with a position that resumes exactly.

One split's token stream is its documents (each [BOS] + tokens + EOS, as prepare writes them)
back to back, in source order, epoch after epoch; window g is tokens [g*seq_len, g*seq_len +
seq_len + 1), the same concat-and-chunk as prepared shards. The position in that stream is where
the next window starts: the epoch, the source position in front of the document holding that
token, and how many of the document's tokens lie before it. Re-tokenizing that one document on
resume rebuilds the packing buffer, so the position stays small whatever the documents' length.
"""
from __future__ import annotations

import collections
import copy
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from zeroforge.data.config import DataConfig
from zeroforge.data.corpus import SourceReader, describe_source, is_validation
from zeroforge.data.encode import DocumentEncoder
from zeroforge.data.errors import DataError

# Documents tokenized per batch: the fast tokenizer's batch encoder amortises its overhead over
# them, while the read-ahead stays small.
_BATCH_DOCUMENTS = 64


@dataclass
class _Document:
    source: dict  # the reader's position in front of this document
    epoch: int
    tokens: np.ndarray
    offset: int = 0  # tokens already behind the stream position


class PackedStream:
    """Windows of seq_len + 1 tokens of one split ("train" or "validation") of a streamed source."""

    def __init__(
        self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, split: str, seq_len: int,
        position: Optional[dict] = None,
    ):
        self.cfg, self.split, self.seq_len = cfg, split, seq_len
        # Plain values for the per-document split test: an OmegaConf read costs as much as a small document.
        self.fraction, self.held_out = cfg.validation_fraction, split == "validation"
        self.encoder = DocumentEncoder(tokenizer, np.dtype(np.int64))
        start = position or {"epoch": 0, "source": None, "offset": 0}
        self.epoch = start["epoch"]
        self.reader = SourceReader(cfg, start["source"])
        self.documents: Iterator[tuple[str, str]] = iter(self.reader)
        self.skip_first = start["offset"]  # the resumed document's tokens before the position
        self.buffer: collections.deque[_Document] = collections.deque()
        self.buffered = 0
        # Whether this epoch's reader began at the source's start, and has found a document of
        # the split: an epoch from the start without one would loop for ever.
        self.from_start, self.read_in_epoch = start["source"] is None, False

    def position(self) -> dict:
        """Where the next window starts; a PackedStream built with it continues there."""
        if self.buffer:
            head = self.buffer[0]
            return {"epoch": head.epoch, "source": copy.deepcopy(head.source), "offset": head.offset}
        return {"epoch": self.epoch, "source": self.reader.position(), "offset": 0}

    def windows(self, count: int) -> np.ndarray:
        """The next `count` windows, [count, seq_len + 1], and moves past them."""
        flat = self._peek(count * self.seq_len + 1)
        rows = np.lib.stride_tricks.sliding_window_view(flat, self.seq_len + 1)[:: self.seq_len]
        self.skip(count)
        return rows.copy()  # a writable array of its own: the view is read-only (and torch warns)

    def skip(self, count: int) -> None:
        """Moves past `count` windows without building them (their documents are still read)."""
        left = count * self.seq_len
        while left:
            if not self.buffer:
                self.fill()
            head = self.buffer[0]
            step = min(left, len(head.tokens) - head.offset)
            head.offset += step
            self.buffered -= step
            left -= step
            if head.offset == len(head.tokens):
                self.buffer.popleft()

    def _peek(self, length: int) -> np.ndarray:
        while self.buffered < length:
            self.fill()
        pieces, need = [], length
        for doc in self.buffer:
            piece = doc.tokens[doc.offset : doc.offset + need]
            pieces.append(piece)
            need -= len(piece)
            if not need:
                break
        return np.concatenate(pieces)

    def fill(self, next_epoch: bool = True) -> bool:
        """Tokenizes the next batch of this split's documents into the buffer; at the end of the
        source, from the start of the next epoch, or (next_epoch False) returns False."""
        sources, texts = self._read_batch()
        while not texts:
            if not next_epoch:
                return False
            if self.from_start and not self.read_in_epoch:
                raise DataError(
                    f"data source {describe_source(self.cfg)} has no {self.split} documents (data."
                    f"validation_fraction={self.cfg.validation_fraction}); expected at least one."
                )
            self.epoch += 1
            self.reader = SourceReader(self.cfg)
            self.documents, self.from_start, self.read_in_epoch = iter(self.reader), True, False
            sources, texts = self._read_batch()
        tokens, lengths = self.encoder(texts)
        for source, piece in zip(sources, np.split(tokens, np.cumsum(lengths)[:-1])):
            self.buffer.append(_Document(source, self.epoch, piece, offset=self.skip_first))
            self.buffered += len(piece) - self.skip_first
            self.skip_first = 0
        return True

    def _read_batch(self) -> tuple[list[dict], list[str]]:
        sources: list[dict] = []
        texts: list[str] = []
        while len(texts) < _BATCH_DOCUMENTS:
            source = self.reader.position()
            item = next(self.documents, None)
            if item is None:
                break
            key, text = item
            if is_validation(key, self.fraction) == self.held_out:
                sources.append(source)
                texts.append(text)
                self.read_in_epoch = True
        return sources, texts


def stream_validation_batches(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seq_len: int, batch_size: int, num_batches: int
) -> list[torch.Tensor]:
    """The first windows of the held-out documents, in order: the same numbers on every run.

    The source is read from its start until there are enough (or it ends): held-out documents
    are chosen by the same hash of their key as prepare's validation split.
    """
    stream = PackedStream(cfg, tokenizer, "validation", seq_len)
    wanted = batch_size * num_batches
    while stream.buffered < wanted * seq_len + 1 and stream.fill(next_epoch=False):
        pass
    count = min(wanted, (stream.buffered - 1) // seq_len)
    if count < 1:
        raise DataError(
            f"data source {describe_source(cfg)}: its validation documents have {stream.buffered} tokens, "
            f"fewer than one sample of data.seq_len + 1 = {seq_len + 1}; use more data or a larger "
            "data.validation_fraction."
        )
    return list(torch.from_numpy(stream.windows(count)).split(batch_size))
