"""Typed config of the data pipeline. A field's rule (range or choices) is its metadata, which
zeroforge.trainer.validate checks before anything runs: "min"/"max" inclusive, "above"/"below"
exclusive, "choices", and "each" for every element of a list."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional, cast

from omegaconf import OmegaConf


@dataclass
class MixtureSourceConfig:
    """One source of a mixture; the tokenizer, split and sizes are the data section's own."""

    name: str = "???"
    weight: float = field(default=1.0, metadata={"above": 0})
    source: str = "???"
    data_files: list[str] = field(default_factory=list)
    subset: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    max_documents: Optional[int] = field(default=None, metadata={"min": 1})


@dataclass
class DataConfig:
    name: str = "embedded"
    # "prepared": tokenized once into shards under cache_dir, sampled in a seeded order.
    # "stream": tokenized while training, partition by partition (data/stream.py); needs a named tokenizer.
    mode: str = field(default="prepared", metadata={"choices": ["prepared", "stream"]})
    # "embedded": the Python standard library's own source, present on every machine.
    # Otherwise a `datasets` source: a hub name, or a builder ("json", "parquet", "text")
    # reading `data_files`.
    source: str = "embedded"
    data_files: list[str] = field(default_factory=list)
    subset: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    # Share of documents held out for validation, chosen by a hash of each document's key.
    validation_fraction: float = field(default=0.05, metadata={"above": 0, "below": 1})
    max_documents: Optional[int] = field(default=None, metadata={"min": 1})
    # "embedded": a byte-level BPE trained on the source; otherwise an AutoTokenizer name or path.
    tokenizer: str = "embedded"
    # A byte-level BPE starts from the 256 byte tokens and needs room for merges.
    tokenizer_vocab_size: int = field(default=4096, metadata={"min": 512})
    seq_len: int = field(default=128, metadata={"min": 1})
    # Prepared shards live under cache_dir/<name>-<fingerprint>, shared by runs on the same data.
    cache_dir: str = "~/.cache/zeroforge/data"
    shard_tokens: int = field(default=67108864, metadata={"min": 1})
    # Tokenizing processes for prepare; null: one per available core. The output is the same for any number.
    prepare_workers: Optional[int] = field(default=None, metadata={"min": 1})
    # Dataloader worker processes per rank that build batches ahead of the step (0: in the
    # training process). The data order does not depend on it. Streaming: each worker tokenizes
    # its share of the rank's partitions, so at most stream_partitions / data-parallel size.
    num_workers: int = field(default=0, metadata={"min": 0})
    # Streaming: the source splits into this many partitions (by shard where it has at least this
    # many, by document where it is one shard), each packed on its own; global sample g is the
    # (g div P)-th window of partition g mod P, and partition p is read by data-parallel rank
    # p mod dp, so the data-parallel size must divide it. Fixed for the life of a run: a resume
    # with another count is refused.
    stream_partitions: int = field(default=64, metadata={"min": 1})
    # Streaming: shuffle each partition's documents within consecutive windows of this many (a
    # permutation seeded by seed, partition, epoch and window number; exactly restored on resume;
    # costs the window's texts in memory per partition). 0: source order.
    stream_shuffle_window: int = field(default=0, metadata={"min": 0})
    # Several sources blended by weight (each prepared on its own, all with data.tokenizer, which
    # cannot be "embedded" here); when set, source/data_files/subset/split/text_field above are unused.
    mixture: list[MixtureSourceConfig] = field(default_factory=list)
    # Packed documents: restart position_ids after each EOS (attention stays within a document
    # only where the model's attention takes packed positions, e.g. flash_attention_2), and take
    # no loss on the pair from a document's EOS to the next document's first token.
    reset_position_ids: bool = False
    mask_cross_document_loss: bool = False


def plain(node: Any, resolve: bool = True) -> dict[str, Any]:
    """A config section (composed, or its dataclass) as plain containers, enums as their names."""
    if OmegaConf.is_config(node):
        return cast(dict[str, Any], OmegaConf.to_container(node, resolve=resolve, enum_to_str=True))
    return cast(dict[str, Any], _plain_value(node))


def _plain_value(value: Any) -> Any:
    """Dataclasses' values are resolved already: a string such as "echo ${HOME}" is text, which
    OmegaConf would read as an interpolation again."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_value(v) for v in value]
    return value.name if isinstance(value, Enum) else value
