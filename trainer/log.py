"""Rank-aware logging, set up once: rank 0 prints info, every rank prints warnings and errors;
a warning every rank reaches alike (from numbers reduced over the ranks) is printed by rank 0 only:
`log.warning(..., extra=SAME_ON_EVERY_RANK)`."""

from __future__ import annotations

import logging
import sys

SAME_ON_EVERY_RANK = {"same_on_every_rank": True}


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, level: int):
        super().__init__()
        self.rank, self.level = rank, level

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank_tag = "" if self.rank == 0 else f"[rank {self.rank}] "
        if getattr(record, "same_on_every_rank", False):
            return self.rank == 0
        return self.rank == 0 and record.levelno >= self.level or record.levelno >= logging.WARNING


def setup_logging(rank: int = 0, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(rank_tag)s%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    # An unknown level logs at INFO until the config check refuses it with the choices.
    threshold = logging.getLevelName(str(level).upper())
    threshold = threshold if isinstance(threshold, int) else logging.INFO
    handler.addFilter(_RankFilter(rank, threshold))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(min(threshold, logging.WARNING) if rank == 0 else logging.WARNING)
    # DeepSpeed and transformers log verbosely on every rank; their warnings still come through.
    for name in ("DeepSpeed", "deepspeed", "transformers", "datasets", "httpx", "torch", "compilers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
        ds_logger.propagate = False
    except ImportError:
        pass
