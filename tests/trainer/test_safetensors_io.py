"""The streaming safetensors writer and the flat-range reader, against safetensors' own reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from zeroforge.trainer.safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    ShardedWriter,
    TensorSpec,
    plan_shards,
    read_flat_range,
    tensor_shapes,
    weight_files,
)


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32),  # 8 KiB
        "a.bias": torch.randn(32).to(torch.bfloat16),
        "b.weight": torch.randn(256, 64),  # 64 KiB: larger than a shard on its own
        "steps": torch.arange(5),
        "scale": torch.tensor(2.5),
    }


def _write(out: Path, tensors: dict[str, torch.Tensor], shard_bytes: int) -> ShardedWriter:
    writer = ShardedWriter(out, [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], shard_bytes)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    return writer


def test_sharded_files_read_back_exactly_with_an_index(tmp_path: Path) -> None:
    tensors = _tensors()
    writer = _write(tmp_path, tensors, shard_bytes=16 * 1024)
    assert writer.files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["weight_map"] == {
        "a.weight": writer.files[0],
        "a.bias": writer.files[0],
        "b.weight": writer.files[1],
        "steps": writer.files[2],
        "scale": writer.files[2],
    }
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    read = {}
    for file in writer.files:
        read.update(load_file(tmp_path / file))
    assert read.keys() == tensors.keys()
    assert all(read[k].dtype == v.dtype and torch.equal(read[k], v) for k, v in tensors.items())
    assert weight_files(tmp_path) == {k: tmp_path / f for k, f in index["weight_map"].items()}
    assert tensor_shapes(weight_files(tmp_path)) == {k: tuple(v.shape) for k, v in tensors.items()}


def test_one_shard_is_model_safetensors_without_an_index(tmp_path: Path) -> None:
    tensors = _tensors()
    _write(tmp_path, tensors, shard_bytes=2**30)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE]
    assert all(torch.equal(load_file(tmp_path / SINGLE_FILE)[k], v) for k, v in tensors.items())


def test_shards_follow_the_size_and_a_large_tensor_gets_its_own() -> None:
    specs = [TensorSpec(f"t{i}", (n,), torch.float32) for i, n in enumerate([10, 10, 100, 5, 5])]
    assert [[s.name for s in shard] for shard in plan_shards(specs, 80)] == [["t0", "t1"], ["t2"], ["t3", "t4"]]


def test_tensors_out_of_order_or_missing_are_refused(tmp_path: Path) -> None:
    tensors = _tensors()
    writer = ShardedWriter(tmp_path, [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], 2**30)
    with pytest.raises(ValueError, match=r"expected a.weight \[64, 32\] torch.float32 next, got a.bias"):
        writer.write("a.bias", tensors["a.bias"])
    writer.write("a.weight", tensors["a.weight"])
    with pytest.raises(ValueError, match="4 tensors were never written, a.bias first"):
        writer.close()


@pytest.mark.parametrize("start,end", [(0, 7), (5, 40), (31, 33), (100, 2048), (0, 2048)])
def test_a_flat_range_is_read_from_its_rows(tmp_path: Path, start: int, end: int) -> None:
    tensor = torch.randn(64, 32)
    save_file({"w": tensor, "v": torch.randn(9), "s": torch.tensor(1.5)}, tmp_path / "m.safetensors")
    assert torch.equal(read_flat_range(tmp_path / "m.safetensors", "w", start, end), tensor.reshape(-1)[start:end])
    assert read_flat_range(tmp_path / "m.safetensors", "s", 0, 1).item() == 1.5
