"""Tokenizing document batches, in this process or in a pool of worker processes, in order.

Each document becomes [BOS] + tokens + [EOS] (BOS only where the tokenizer puts one in front of
text itself). Batches go through the fast tokenizer's Rust batch encoder; the results come back
in submission order, so the output does not depend on the number of workers.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import multiprocessing.pool
import os
import sys
import types
from typing import TYPE_CHECKING, Iterable, Iterator, Optional, TypeVar

import numpy as np

if TYPE_CHECKING:
    # Only for type hints: a spawned worker that imported transformers would start ~10x slower.
    from transformers import PreTrainedTokenizerBase

# Batches in flight per worker: enough to keep every worker busy, few enough that a corpus
# larger than memory streams through instead of being read ahead in full.
IN_FLIGHT_PER_WORKER = 4
# What a caller tags each batch of texts with, handed back with its encoding.
Tag = TypeVar("Tag")


def uses_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos]


class DocumentEncoder:
    """texts -> (concatenated token ids, tokens per document), EOS (and BOS) included."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, dtype: np.dtype):
        self.tokenizer, self.dtype = tokenizer, dtype
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.prefix = [tokenizer.bos_token_id] if uses_bos(tokenizer) else []
        self.suffix = [tokenizer.eos_token_id]

    def __getstate__(self) -> dict:
        # A fast tokenizer's Rust backend is all a worker needs, and unpickles without transformers.
        state = dict(self.__dict__)
        if self.backend is not None:
            state["tokenizer"] = None
        return state

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.backend is not None:
            # The Rust encoder without offsets: what a fast tokenizer spends on a batch, no more.
            ids = [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        else:
            ids = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        extra = len(self.prefix) + len(self.suffix)
        lengths = np.fromiter((len(d) + extra for d in ids), dtype=np.int64, count=len(ids))
        flat: list[int] = []
        for doc in ids:  # one list, converted once: faster than a numpy slice per document
            flat += self.prefix
            flat += doc
            flat += self.suffix
        return np.array(flat, dtype=self.dtype), lengths


_worker_encoder: Optional[DocumentEncoder] = None


def _init_worker(encoder: DocumentEncoder) -> None:
    global _worker_encoder
    # Each worker is one tokenizing thread; the pool is the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_encoder = encoder


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _worker_encoder is not None
    return _worker_encoder(texts)


@contextlib.contextmanager
def main_module_hidden() -> Iterator[None]:
    """Processes spawned meanwhile start without importing this process's __main__.

    A spawned process imports the parent's __main__ first, which workers of this package never
    use: under the trainer that is torch and DeepSpeed in every worker (minutes for 16 workers on
    a 16-core GPU host), and a script without an `if __name__ == "__main__"` guard would run again.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


@contextlib.contextmanager
def _spawn_pool(workers: int, encoder: DocumentEncoder) -> Iterator[multiprocessing.pool.Pool]:
    """A pool of `workers` spawned processes, each holding the encoder.

    spawn, not fork: a process that already ran the tokenizers library's thread pool (training
    the embedded tokenizer does) can deadlock in a forked child. The pool starts all its workers
    in its constructor, so __main__ is hidden only for that.
    """
    context = multiprocessing.get_context("spawn")
    with main_module_hidden():
        pool = context.Pool(workers, initializer=_init_worker, initargs=(encoder,))
    with pool:
        yield pool


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def encode_batches(
    encoder: DocumentEncoder, batches: Iterable[tuple[Tag, list[str]]], workers: int
) -> Iterator[tuple[Tag, tuple[np.ndarray, np.ndarray]]]:
    """(tag, texts) -> (tag, encoded texts), in the order given, with `workers` processes."""
    if workers <= 1:
        for tag, texts in batches:
            yield tag, encoder(texts)
        return
    with _spawn_pool(workers, encoder) as pool:
        pending: collections.deque = collections.deque()
        for tag, texts in batches:
            pending.append((tag, pool.apply_async(_encode_in_worker, (texts,))))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                done_tag, result = pending.popleft()
                yield done_tag, result.get()
        while pending:
            done_tag, result = pending.popleft()
            yield done_tag, result.get()
