"""HF safetensors weights written and read one tensor at a time.

Written in Hugging Face's sharded layout (model-0000i-of-0000n.safetensors with
model.safetensors.index.json, or one model.safetensors), by a writer that knows every tensor's
name, dtype and shape up front: each shard's header is written when the shard is opened, and each
tensor goes to disk as soon as it is given, so none is kept (the host holds one tensor at a time,
whatever the shard size). Read, for model.init_from under ZeRO-3, by flat ranges of a tensor, so a
rank reads its own slice of each weight and nothing else.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional, Sequence

import torch

from zeroforge.trainer.config import ConfigError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors' names for torch dtypes (its format specification).
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(specs: Sequence[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors, a new shard whenever the next would pass shard_bytes (a tensor larger
    than that gets a shard of its own, as in transformers' save_pretrained)."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if not shards or (size + spec.nbytes > shard_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(specs: Sequence[TensorSpec]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": _DTYPES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(encoded)) + encoded


class ShardedWriter:
    """Writes `specs` into `out`, in that order, one tensor per write()."""

    def __init__(self, out: Path, specs: Sequence[TensorSpec], shard_bytes: int):
        unsupported = sorted({str(s.dtype) for s in specs if s.dtype not in _DTYPES})
        if unsupported:
            raise ValueError(f"safetensors cannot hold dtypes {unsupported}")
        self.out = out
        self.shards = plan_shards(specs, shard_bytes)
        count = len(self.shards)
        self.files = [SINGLE_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self._queue = [(i, spec) for i, shard in enumerate(self.shards) for spec in shard]
        self._next = 0
        self._file: Optional[BinaryIO] = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, spec = self._queue[self._next]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"expected {spec.name} {list(spec.shape)} {spec.dtype} next, got {name} {list(tensor.shape)} {tensor.dtype}")
        if self._file is None:
            self._file = open(self.out / self.files[shard], "wb")
            self._file.write(_header(self.shards[shard]))
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(data.numpy().data)
        self._next += 1
        if self._next == len(self._queue) or self._queue[self._next][0] != shard:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """After the last tensor: the index, when there is more than one shard."""
        if self._next != len(self._queue):
            missing = [spec.name for _, spec in self._queue[self._next :]]
            raise ValueError(f"{len(missing)} tensors were never written, {missing[0]} first")
        if len(self.files) > 1:
            weight_map = {spec.name: self.files[i] for i, shard in enumerate(self.shards) for spec in shard}
            total = sum(spec.nbytes for shard in self.shards for spec in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Which file holds each tensor of an HF model directory (an index, or one model.safetensors)."""
    if (model_dir / INDEX_FILE).exists():
        weight_map = json.loads((model_dir / INDEX_FILE).read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    if (model_dir / SINGLE_FILE).exists():
        from safetensors import safe_open

        with safe_open(model_dir / SINGLE_FILE, framework="pt") as f:
            return {name: model_dir / SINGLE_FILE for name in f.keys()}
    found = sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else []
    raise ConfigError(
        f"{model_dir}: expected safetensors weights ({SINGLE_FILE}, or {INDEX_FILE} with its shards), found {found}; "
        "partitioned loading (ZeRO-3) reads safetensors only: convert the checkpoint with save_pretrained first."
    )


def tensor_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, read from the headers only."""
    from safetensors import safe_open

    shapes = {}
    for path in sorted(set(files.values())):
        with safe_open(path, framework="pt") as f:
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    return shapes


def read_flat_range(path: Path, name: str, start: int, end: int) -> torch.Tensor:
    """Elements [start, end) of the flattened tensor `name`, reading only the rows that hold them.
    The file is mapped only while the rows are copied out, so its pages do not stay resident."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        piece = f.get_slice(name)
        shape = piece.get_shape()
        if len(shape) == 0:
            return f.get_tensor(name).reshape(-1)[start:end]
        row = math.prod(shape[1:])
        first, last = start // row, -(-end // row)
        rows = piece[first:last].reshape(-1)
    return rows[start - first * row : end - first * row].clone()
