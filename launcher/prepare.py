"""`zeroforge prepare [overrides]` (or `python -m zeroforge.launcher.prepare`): tokenize and shard
the configured data ahead of training, into data.cache_dir; training finds it by fingerprint."""

from __future__ import annotations

from omegaconf import DictConfig

from zeroforge.data.mixture import open_split
from zeroforge.data.prepare import SPLITS, prepare
from zeroforge.trainer.entry import entry_point
from zeroforge.trainer.log import setup_logging


@entry_point
def main(cfg: DictConfig) -> None:
    setup_logging(0, cfg.logging.level)
    out = prepare(cfg.data)
    for split in SPLITS:
        open_split(out, split)  # a missing or truncated shard is reported now, not when training starts
    print(out)


if __name__ == "__main__":
    main()
