"""`zeroforge prepare [overrides]` (or `python -m zeroforge.launcher.prepare`): tokenize and shard
the configured data ahead of training, into data.cache_dir; training finds it by fingerprint."""

from __future__ import annotations

from omegaconf import DictConfig

from zeroforge.data.prepare import prepare
from zeroforge.trainer.entry import entry_point
from zeroforge.trainer.log import setup_logging


@entry_point
def main(cfg: DictConfig) -> None:
    setup_logging(0, cfg.logging.level)
    print(prepare(cfg.data))


if __name__ == "__main__":
    main()
