"""`python -m launcher [overrides]`: compose and validate the config, then run the job."""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from launcher.cli import run_entry_point
from launcher.config import CONF_DIR
from launcher.local import launch
from trainer.log import setup_logging


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup_logging(0, cfg.logging.level)
    code = run_entry_point(lambda: launch(cfg, list(HydraConfig.get().overrides.task)))
    sys.exit(code)


if __name__ == "__main__":
    main()
