"""`zeroforge prepare [overrides]` (or `python -m zeroforge.launcher.prepare`): tokenize and shard
the configured data ahead of training, into data.cache_dir; training finds it by fingerprint."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from zeroforge.data.prepare import prepare
from zeroforge.trainer.config import CONF_DIR
from zeroforge.trainer.entry import run_entry_point
from zeroforge.trainer.log import setup_logging


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup_logging(0, cfg.logging.level)
    run_entry_point(lambda: print(prepare(cfg.data)))


if __name__ == "__main__":
    main()
