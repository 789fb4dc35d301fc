"""The plain Hugging Face export of a training run: config, sharded safetensors and tokenizer,
named as the plain model names them, written one tensor at a time and swapped in whole."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, cast

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from zeroforge.trainer.distributed import DistInfo, barrier
from zeroforge.trainer.partitioned import full_shape
from zeroforge.trainer.safetensors_io import ShardedWriter, TensorSpec

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

log = logging.getLogger("zeroforge")


def export_entries(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What an export holds, named as the plain model names them: parameters and persistent
    buffers in state_dict order, a tied weight once, under its first name (as save_pretrained keeps it)."""
    seen: set[int] = set()
    entries = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            entries.append((name, tensor))
    return entries


class Entry(NamedTuple):
    """One tensor of the export: its plain name, shape and dtype, and how to get it in full on rank
    0's host (None on the other ranks; every rank must fetch every entry, in the same order)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    fetch: Callable[[], Optional[torch.Tensor]]


@contextlib.contextmanager
def gathered(tensor: torch.Tensor) -> Iterator[None]:
    """A ZeRO-3 parameter in full for the duration, from every rank (any other tensor is whole already)."""
    if hasattr(tensor, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor]):
            yield
    else:
        yield


def host_copy(tensor: torch.Tensor, dist: DistInfo) -> Callable[[], Optional[torch.Tensor]]:
    """Fetches the tensor in full onto rank 0's host, copied out before ZeRO-3 partitions it again."""

    def fetch() -> Optional[torch.Tensor]:
        with gathered(tensor):
            return tensor.detach().to("cpu", copy=True) if dist.is_main else None

    return fetch


def planned_entries(model: torch.nn.Module, dist: DistInfo) -> list[Entry]:
    """The export's tensors (export_entries); a model whose MoE blocks AutoEP replaced is written
    back in the plain layout (trainer/autoep_export.py)."""
    from zeroforge.trainer.autoep_export import autoep_blocks, plain_entries

    entries = export_entries(model)
    if autoep_blocks(model):
        return plain_entries(model, entries, dist)
    return [Entry(name, tuple(full_shape(t)), t.dtype, host_copy(t, dist)) for name, t in entries]


def export_hf(
    engine: DeepSpeedEngine,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    dist: DistInfo,
    meta: dict[str, Any],
    shard_bytes: int,
) -> Path:
    """Write config, sharded safetensors weights and tokenizer from the training engine; the
    directory appears complete or not at all. Every rank must call it. Rank 0 writes each tensor as
    it arrives, so its host holds one parameter at a time, whatever the model's size."""
    out = Path(out_dir)
    model = engine.module
    entries = planned_entries(model, dist)
    tensors = ((entry.name, entry.fetch()) for entry in entries)
    if dist.is_main:
        specs = [TensorSpec(e.name, e.shape, e.dtype) for e in entries]
        write_export(
            model.config, specs, cast(Iterator[tuple[str, torch.Tensor]], tensors), tokenizer, out, meta, shard_bytes
        )  # all of them on rank 0
    else:
        for _ in tensors:
            pass
    barrier()
    return out


def write_export(
    config: PretrainedConfig,
    specs: list[TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    meta: dict[str, Any],
    shard_bytes: int,
) -> None:
    """Write into out.tmp, then swap it in: `out` is always a complete export, old or new. The
    weights (`tensors`, in the order of `specs`) go to disk one at a time as HF's sharded
    safetensors; config.json and generation_config.json are what save_pretrained writes."""
    from transformers import GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = copy.deepcopy(config)
    config.dtype = str(next(s.dtype for s in specs if s.dtype.is_floating_point)).removeprefix("torch.")
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__]  # type: ignore[attr-defined]  # a model class
    config.use_cache = True  # training switches the KV cache off; an export is for inference
    config.save_pretrained(tmp)
    GenerationConfig.from_model_config(config).save_pretrained(tmp)
    writer = ShardedWriter(tmp, specs, shard_bytes)
    for name, tensor in tensors:
        writer.write(name, tensor)
    writer.close()
    tokenizer.save_pretrained(str(tmp))
    (tmp / "zeroforge.json").write_text(json.dumps(meta, indent=2))
    old = out.with_name(out.name + ".old")
    if old.exists() and not out.exists():
        old.rename(out)  # an export replaced half-way by a killed run: the old one is the only copy
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    log.info("exported HF weights (%d file(s)) and tokenizer to %s", len(writer.files), out)
