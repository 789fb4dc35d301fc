"""Offline preparation: documents -> tokenizer -> packed token shards + manifest.json.

`zeroforge prepare [overrides]`, or called by the launcher and trainer (cached by fingerprint).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Iterator, Optional, cast

import numpy as np
from omegaconf import OmegaConf
from transformers import PreTrainedTokenizerBase

from zeroforge.data.config import DataConfig, MixtureSourceConfig
from zeroforge.data.corpus import describe_source, is_validation, iter_documents, source_fingerprint
from zeroforge.data.encode import DocumentEncoder, default_workers, encode_batches, uses_bos
from zeroforge.data.errors import DataError
from zeroforge.data.shards import is_prepared, load_manifest
from zeroforge.data.tokenizer import load_tokenizer, tokenizer_hash, train_bpe

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
SPLITS = ("train", "validation")
_BATCH_DOCUMENTS = 64


def component_config(cfg: DataConfig, part: MixtureSourceConfig) -> DataConfig:
    """The data section as it would read with only this mixture source in it."""
    fields = {k: getattr(part, k) for k in ("name", "source", "data_files", "subset", "split", "text_field", "max_documents")}
    return cast(DataConfig, OmegaConf.merge(cfg, fields, {"mixture": []}))  # a DictConfig of the schema


def fingerprint(cfg: DataConfig) -> str:
    if cfg.mixture:
        parts: list = [FORMAT_VERSION, [[p.name, p.weight, fingerprint(component_config(cfg, p))] for p in cfg.mixture]]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    parts = [
        FORMAT_VERSION,
        source_fingerprint(cfg),
        cfg.text_field,
        cfg.validation_fraction,
        cfg.max_documents,
        cfg.tokenizer,
        cfg.tokenizer_vocab_size if cfg.tokenizer == "embedded" else None,
        cfg.shard_tokens,
    ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def prepared_dir(cfg: DataConfig) -> Path:
    return prepared_dir_for(cfg.cache_dir, cfg.name, fingerprint(cfg))


def prepared_dir_for(cache_dir: str, name: str, full_fingerprint: str) -> Path:
    """Where data with this fingerprint was prepared (a checkpoint records the fingerprint)."""
    return Path(cache_dir).expanduser() / f"{name}-{full_fingerprint[:12]}"


class _ShardWriter:
    """Writes one split as shards of about shard_tokens tokens, each with its document-offset index.

    A shard is written under a temporary name and renamed when complete; only then is it
    recorded (in the progress file), so an interrupted prepare never counts a half-written shard.
    """

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int, done: Optional[dict] = None):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict] = list(done["shards"]) if done else []
        # Documents of this split with a lower source position are in the recorded shards.
        self.resume_at: int = done["resume_at"] if done else 0
        self.last_position = -1

    def add(self, position: int, ids: np.ndarray) -> bool:
        """Adds the document at this source position; True when that completed a shard."""
        self.pending.append(ids)
        self.pending_tokens += len(ids)
        self.last_position = position
        if self.pending_tokens >= self.shard_tokens:
            self.flush()
            return True
        return False

    def flush(self) -> None:
        if not self.pending:
            return
        data = np.concatenate(self.pending)
        offsets = np.cumsum([0] + [len(d) for d in self.pending], dtype=np.uint64)
        name = f"{self.split}_{len(self.shards):05d}"
        for suffix, payload in ((".bin", data), (".idx", offsets)):
            tmp = self.out / (name + suffix + ".tmp")
            tmp.write_bytes(payload.tobytes())
            tmp.rename(self.out / (name + suffix))
        self.shards.append(
            {
                "file": name + ".bin",
                "index": name + ".idx",
                "tokens": int(data.size),
                "documents": len(self.pending),
                "sha256": hashlib.sha256(data.tobytes()).hexdigest(),
            }
        )
        self.pending, self.pending_tokens = [], 0
        self.resume_at = self.last_position + 1

    def progress(self) -> dict:
        return {"shards": self.shards, "resume_at": self.resume_at}

    def summary(self) -> dict:
        return {
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": sum(s["documents"] for s in self.shards),
            "shards": self.shards,
        }


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One preparing process per directory; others wait, then find its result."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare(cfg: DataConfig) -> Path:
    """Tokenize the source into cfg.cache_dir once; later calls with the same data return the cache.

    The work happens in <dir>.partial, which an interrupted prepare leaves behind and the next
    call continues from its last complete shard; the directory gets its final name when done.
    A directory of the final name without its manifest is refused (is_prepared).
    """
    if cfg.mixture:
        return _prepare_mixture(cfg)
    out = prepared_dir(cfg)
    if is_prepared(out):
        _check_tokenizer_unchanged(cfg, out)
        return out
    partial, lock = out.with_name(f"{out.name}.partial"), out.with_name(f"{out.name}.lock")
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(lock):
        if is_prepared(out):  # another process finished while this one waited
            return out
        # A partial with its manifest is finished: the last attempt stopped before the rename.
        if not (partial / "manifest.json").exists():
            partial.mkdir(exist_ok=True)
            try:
                _build(cfg, partial)
            except DataError:
                # Bad input: the fix changes the fingerprint, so nothing here would be reused.
                shutil.rmtree(partial, ignore_errors=True)
                lock.unlink(missing_ok=True)
                raise
        partial.rename(out)
    return out


def _prepare_mixture(cfg: DataConfig) -> Path:
    """Each source prepared on its own (and reused by any mixture that has it); the mixture's
    directory holds the weights, the shared tokenizer and a manifest naming the sources."""
    if cfg.tokenizer == "embedded":
        raise DataError(
            "data.mixture needs one tokenizer for all its sources; found data.tokenizer='embedded', which "
            "trains one per source: set data.tokenizer to a hub name or a tokenizer directory."
        )
    names = [p.name for p in cfg.mixture]
    if len(set(names)) != len(names):
        raise DataError(f"data.mixture source names must differ; found {names}.")
    out = prepared_dir(cfg)
    if is_prepared(out):
        return out
    parts = [(p, prepare(component_config(cfg, p))) for p in cfg.mixture]
    first = load_manifest(parts[0][1])
    build = out.with_name(f"{out.name}.partial")
    shutil.rmtree(build, ignore_errors=True)
    shutil.copytree(parts[0][1] / "tokenizer", build / "tokenizer")
    manifest = {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint(cfg),
        "mixture": [{"name": p.name, "weight": p.weight, "dir": d.name} for p, d in parts],
        **{k: first[k] for k in ("tokenizer", "tokenizer_hash", "vocab_size", "eos_id", "bos_id", "dtype")},
    }
    (build / "manifest.json").write_text(json.dumps(manifest, indent=2))
    try:
        build.rename(out)
    except OSError:
        shutil.rmtree(build)  # another process wrote the same mixture first
    return out


def _check_tokenizer_unchanged(cfg: DataConfig, out: Path) -> None:
    """A tokenizer named by path can change in place, which the fingerprint (its name) misses."""
    if cfg.tokenizer == "embedded":
        return  # trained by prepare itself, from the fingerprinted source
    manifest = load_manifest(out)
    now = tokenizer_hash(load_tokenizer(cfg.tokenizer))
    if now != manifest["tokenizer_hash"]:
        raise DataError(
            f"tokenizer {cfg.tokenizer!r} changed since {out} was prepared: its hash was "
            f"{manifest['tokenizer_hash']}, now {now}. Move that directory aside to prepare again."
        )


def _tokenizer(cfg: DataConfig, build: Path) -> PreTrainedTokenizerBase:
    saved = build / "tokenizer"
    if saved.exists():  # resuming: the tokenizer the recorded shards were made with
        return load_tokenizer(saved)
    if cfg.tokenizer == "embedded":
        train_texts = (t for k, t in iter_documents(cfg) if not is_validation(k, cfg.validation_fraction))
        tokenizer: PreTrainedTokenizerBase = train_bpe(train_texts, cfg.tokenizer_vocab_size)
    else:
        tokenizer = load_tokenizer(cfg.tokenizer)
    tmp = build / "tokenizer.tmp"
    tokenizer.save_pretrained(str(tmp))
    tmp.rename(saved)
    return tokenizer


class _Progress:
    """Documents and tokens per second, logged every few seconds and at the end."""

    def __init__(self, every_s: float = 10.0):
        self.start = self.last = time.perf_counter()
        self.every_s, self.documents, self.tokens = every_s, 0, 0

    def add(self, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        if time.perf_counter() - self.last >= self.every_s:
            self.report("prepare")

    def report(self, what: str) -> None:
        self.last = time.perf_counter()
        elapsed = max(self.last - self.start, 1e-9)
        log.info(
            "%s: %d documents, %d tokens in %.1fs (%.0f documents/s, %.0f tokens/s)",
            what,
            self.documents,
            self.tokens,
            elapsed,
            self.documents / elapsed,
            self.tokens / elapsed,
        )


def _build(cfg: DataConfig, build: Path) -> None:
    for unfinished in build.glob("*.tmp"):  # written when the last attempt stopped; never counted
        if unfinished.is_dir():
            shutil.rmtree(unfinished)
        else:
            unfinished.unlink()
    tokenizer = _tokenizer(cfg, build)
    vocab_size = len(tokenizer)
    dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    progress_file = build / "progress.json"
    done = json.loads(progress_file.read_text()) if progress_file.exists() else {}
    writers = {s: _ShardWriter(build, s, dtype, cfg.shard_tokens, done.get(s)) for s in SPLITS}
    workers = cfg.prepare_workers or default_workers()
    resumed = sum(len(w.shards) for w in writers.values())
    log.info(
        "preparing %s into %s with %d workers%s",
        describe_source(cfg),
        build,
        workers,
        f", continuing after {resumed} complete shards" if resumed else "",
    )

    def todo() -> Iterator[tuple[list[tuple[int, str]], list[str]]]:
        """Batches of (source position, split) and texts not yet in a complete shard."""
        batch: list[tuple[int, str]] = []
        texts: list[str] = []
        fraction = cfg.validation_fraction  # read once: an OmegaConf read per document is slow
        for position, (key, text) in enumerate(iter_documents(cfg)):
            split = "validation" if is_validation(key, fraction) else "train"
            if position < writers[split].resume_at:
                continue
            batch.append((position, split))
            texts.append(text)
            if len(batch) == _BATCH_DOCUMENTS:
                yield batch, texts
                batch, texts = [], []
        if batch:
            yield batch, texts

    progress = _Progress()
    for batch, (tokens, lengths) in encode_batches(DocumentEncoder(tokenizer, dtype), todo(), workers):
        completed = False
        for (position, split), stop, length in zip(batch, np.cumsum(lengths).tolist(), lengths.tolist()):
            completed |= writers[split].add(position, tokens[stop - length : stop])
        if completed:
            _write_json(progress_file, {s: w.progress() for s, w in writers.items()})
        progress.add(len(batch), len(tokens))
    progress.report("tokenized")

    for writer in writers.values():
        writer.flush()
    splits = {s: w.summary() for s, w in writers.items()}
    documents = sum(summary["documents"] for summary in splits.values())
    for split, summary in splits.items():
        if summary["tokens"] == 0:
            raise DataError(
                f"data source {describe_source(cfg)}: the {split} split is empty ({documents} "
                f"documents, data.validation_fraction={cfg.validation_fraction}); expected "
                "documents in both splits: add documents or change the fraction."
            )
    manifest = {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint(cfg),
        "source": describe_source(cfg),
        "source_fingerprint": source_fingerprint(cfg),
        "tokenizer": cfg.tokenizer,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "vocab_size": vocab_size,
        "eos_id": tokenizer.eos_token_id,
        "bos_id": tokenizer.bos_token_id if uses_bos(tokenizer) else None,
        "dtype": dtype.name,
        "splits": splits,
    }
    progress_file.unlink(missing_ok=True)
    # Last, and whole or not at all: a manifest in the build marks every shard complete.
    _write_json(build / "manifest.json", manifest)
