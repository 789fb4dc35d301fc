"""`zeroforge export checkpoint=<dir>`: a committed DeepSpeed checkpoint as an HF export
(safetensors, config, tokenizer), with no engine or ranks and without reading the optimizer state."""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig

from zeroforge.trainer.config import ConfigError
from zeroforge.trainer.consolidate import run_config
from zeroforge.trainer.entry import entry_point
from zeroforge.trainer.hf_export import write_export
from zeroforge.trainer.host_memory import peak_rss_bytes, rss_bytes
from zeroforge.trainer.inference_model import inference_dtype, open_checkpoint
from zeroforge.trainer.log import setup_logging

log = logging.getLogger("zeroforge")


def export(cfg: DictConfig) -> Path:
    """Write the export of cfg.export.checkpoint; returns its directory. One tensor at a time: the
    host holds about one parameter (see export_peak_bound), never the model."""
    e = cfg.export
    if not e.checkpoint:
        raise ConfigError(
            "no checkpoint to export: expected checkpoint=<run.dir>/checkpoints/step_<N> (or <run.dir>/checkpoints for its latest)."
        )
    before = rss_bytes()
    source = open_checkpoint(e.checkpoint)
    auto = e.precision == "auto"  # a str Enum: equal to its value
    dtype = source.weights.specs[0].dtype if auto else inference_dtype(e.precision, "cpu")
    specs = [replace(s, dtype=dtype) if s.dtype.is_floating_point else s for s in source.weights.specs]
    out = Path(e.output) if e.output else run_config(source.path)[1] / f"export_{source.path.name}"
    meta = {"step": source.step, "tokens": source.tokens, "prepared_data": str(source.prepared_data), "checkpoint": str(source.path)}
    write_export(source.config, specs, source.weights.tensors(dtype), source.tokenizer, out, meta, int(e.shard_size_gb * 2**30))
    largest = 4 * max(math.prod(s.shape) for s in specs)
    log.info(
        "export: peak host memory %d MiB, %d MiB above the %d MiB the process held before it "
        "(bound: 2 x the largest tensor in fp32, %d MiB, + 64 MiB)",
        peak_rss_bytes() >> 20,
        (peak_rss_bytes() - before) >> 20,
        before >> 20,
        export_peak_bound(largest) >> 20,
    )
    return out


def export_peak_bound(largest_tensor_bytes: int) -> int:
    """What an export from a checkpoint adds to the process's own memory, at most: the tensor being
    assembled and one rank's slice of it being read (both at most the largest tensor, in fp32),
    plus the checkpoint's index (the pickled structure of its files) and the tokenizer."""
    return 2 * largest_tensor_bytes + (64 << 20)


@entry_point
def main(cfg: DictConfig) -> None:
    setup_logging(0, cfg.logging.level)
    export(cfg)


def checkpoint_argument(argv: list[str]) -> list[str]:
    """`checkpoint=<dir>` means export.checkpoint: in the schema `checkpoint` is the checkpointing
    section, which a plain path cannot replace."""
    return [f"export.{arg}" if arg.startswith("checkpoint=") else arg for arg in argv]


if __name__ == "__main__":
    sys.argv = checkpoint_argument(sys.argv)
    main()
