"""`python -m zeroforge.launcher.torchrun [torchrun arguments]`: torchrun, with the ranks' exit codes.

torchrun reports any failed rank as a `ChildFailedError` traceback and exit code 1, which would
bury the one paragraph a rank printed for a user's mistake (exit code 2) and hide a rank's
"stopped, requeue me" (75). This runs torchrun's own launcher and exits with the code that says
what happened: 2 when a rank refused the job, 76 when the ranks found the job hung
(trainer/watchdog.py), 75 when the ranks stopped to be requeued, else the failed rank's own code.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from zeroforge.trainer.entry import USER_ERROR_EXIT_CODE
from zeroforge.trainer.preemption import REQUEUE_EXIT_CODE
from zeroforge.trainer.watchdog import HANG_EXIT_CODE, node_name


def exit_code(rank_codes: Sequence[int]) -> int:
    """One code for the node from its ranks' codes (torchrun kills the others once one fails):
    zeroforge's own codes first, then a rank's other code, or 128 + the signal that killed it,
    as a shell reports it (137: killed, often for memory)."""
    for code in (USER_ERROR_EXIT_CODE, HANG_EXIT_CODE, REQUEUE_EXIT_CODE):
        if code in rank_codes:
            return code
    exited = [c for c in rank_codes if c > 0]
    if exited:
        return exited[0]
    killed = [-c for c in rank_codes if c < 0]
    return 128 + killed[0] if killed else 1


def main(argv: Optional[Sequence[str]] = None) -> None:
    started = os.environ.get("ZF_NODES_STARTED")
    if started:  # this node got as far as torchrun: the rendezvous does not wait for it (launcher/hang_requeue.py)
        (Path(started) / node_name()).touch()
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(list(sys.argv[1:] if argv is None else argv)))
    except ChildFailedError as failed:
        sys.exit(exit_code([f.exitcode for f in failed.failures.values()]))


if __name__ == "__main__":
    main()
