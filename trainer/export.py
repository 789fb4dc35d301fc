"""`zeroforge export checkpoint=<dir>`: a committed DeepSpeed checkpoint as an HF export
(safetensors, config, tokenizer), with no engine or ranks and without reading the optimizer state."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig

from zeroforge.trainer.checkpoint import MANIFEST, write_export
from zeroforge.trainer.config import ConfigError
from zeroforge.trainer.consolidate import run_config
from zeroforge.trainer.entry import entry_point
from zeroforge.trainer.export_io import inference_dtype, load_checkpoint
from zeroforge.trainer.log import setup_logging

log = logging.getLogger("zeroforge")


def export(cfg: DictConfig) -> Path:
    """Write the export of cfg.export.checkpoint; returns its directory."""
    e = cfg.export
    if not e.checkpoint:
        raise ConfigError(
            "no checkpoint to export: expected checkpoint=<run.dir>/checkpoints/step_<N> "
            "(or <run.dir>/checkpoints for its latest)."
        )
    auto = e.precision == "auto"  # a str Enum: equal to its value
    loaded = load_checkpoint(e.checkpoint, "cpu", None if auto else inference_dtype(e.precision, "cpu"))
    step_dir = loaded.path
    out = Path(e.output) if e.output else run_config(step_dir)[1] / f"export_{step_dir.name}"
    run = json.loads((step_dir / MANIFEST).read_text())["run"]
    meta = {"step": loaded.step, "tokens": run["tokens"], "prepared_data": str(loaded.prepared_data), "checkpoint": str(step_dir)}
    write_export(loaded.model, None, loaded.tokenizer, out, meta)
    return out


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
