"""What every entry point shares: a user's mistake ends in one clear paragraph, not a traceback."""
from __future__ import annotations

import sys
from typing import Callable, TypeVar

from zeroforge.data.errors import DataError
from zeroforge.trainer.config import ConfigError
from zeroforge.trainer.distributed import StartupAborted
from zeroforge.trainer.faults import TrainingDiverged
from zeroforge.trainer.preemption import REQUEUE_EXIT_CODE, Preempted

T = TypeVar("T")

USER_ERROR_EXIT_CODE = 2


def run_entry_point(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except (ConfigError, DataError, StartupAborted) as err:
        kind = "configuration error" if isinstance(err, ConfigError) else "data error" if isinstance(err, DataError) else "stopped"
        print(f"zeroforge: {kind}: {err}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT_CODE)
    except TrainingDiverged as diverged:
        print(f"zeroforge: training stopped: {diverged}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Preempted as stopped:
        print(f"zeroforge: {stopped} (exit code {REQUEUE_EXIT_CODE}: requeue me)", file=sys.stderr, flush=True)
        sys.exit(REQUEUE_EXIT_CODE)
