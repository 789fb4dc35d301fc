"""After the ranks of a Slurm job end, in slurm/pretrain.sh: did the job hang, and without which
nodes does it go again?

`python -m zeroforge.launcher.hang_requeue <run.dir> <srun status> <started dir> <job nodes> <max>`
prints the report and exits 76 (HANG_EXIT_CODE) where the job hung, 0 where it did not. Where it
hung and may go again, it prints one line on stdout, `requeue <nodes>`, the nodes to leave out
(none where no node was named); the script holds the job, adds them to its excluded nodes and
requeues it. The job hung where:
- the ranks said so (exit 76), or left dumps behind (killed before the report), or wrote a report
  during this attempt (trainer/watchdog.py, trainer/hang_report.py): the report's stuck hosts;
- it failed and some of its nodes never reached torchrun, whose start leaves a mark in the
  attempt's started dir (launcher/torchrun.py; the script writes .attempt there as it begins): a node stuck before the rendezvous.
Each job id is requeued for hangs at most `cluster.max_hang_requeues` times (hangs/requeues.jsonl).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple, Optional

from zeroforge.trainer.hang_report import newest_report, write_rendezvous_report, write_report
from zeroforge.trainer.watchdog import HANG_EXIT_CODE, PENDING, hangs_dir

REQUEUES = "requeues.jsonl"
# Written by the script in the started dir as the attempt begins: its time is the attempt's.
ATTEMPT = ".attempt"


class Hang(NamedTuple):
    report: Path  # the readable summary; the .json beside it holds the verdict
    nodes: list[str]  # to exclude


def find_hang(run_dir: Path, status: int, started: Path, job_nodes: list[str]) -> Optional[Hang]:
    """The hang this attempt ended in, or None where it ended otherwise."""
    hangs = hangs_dir(run_dir)
    if status == 0:
        return None
    report = write_report(hangs) if (hangs / PENDING).exists() else None
    newest = newest_report(hangs)
    begun = (started / ATTEMPT).stat().st_mtime
    if report is None and newest is not None and (status == HANG_EXIT_CODE or newest.stat().st_mtime >= begun):
        report = newest
    if report is not None:
        return Hang(report, json.loads(report.with_suffix(".json").read_text())["stuck_hosts"])
    missing = [node for node in job_nodes if not (started / node).exists()]
    if not missing or len(missing) == len(job_nodes):  # none, or all: no node to tell apart
        return None
    return Hang(write_rendezvous_report(hangs, missing, job_nodes), missing)


def record_requeue(hangs: Path, job_id: str, nodes: list[str], max_requeues: int) -> Optional[int]:
    """This job's hang requeues so far, counted with this one; None where none is left."""
    path = hangs / REQUEUES
    done = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    count = sum(1 for r in done if r["job"] == job_id)
    if count >= max_requeues:
        return None
    entry: dict[str, Any] = {"job": job_id, "restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0), "exclude": nodes}
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    return count + 1


def main(argv: Optional[list[str]] = None) -> int:
    run_dir, status, started, nodes, max_requeues = sys.argv[1:] if argv is None else argv
    hang = find_hang(Path(run_dir), int(status), Path(started), [n for n in nodes.split(",") if n])
    if hang is None:
        return 0
    print(hang.report.read_text(), end="", file=sys.stderr)
    job_id = os.environ.get("SLURM_JOB_ID", "")
    count = record_requeue(hangs_dir(run_dir), job_id, hang.nodes, int(max_requeues))
    if count is None:
        print(f"zeroforge: job {job_id} hung and is not requeued: cluster.max_hang_requeues={max_requeues} reached", file=sys.stderr)
    else:
        without = f" without {','.join(hang.nodes)}" if hang.nodes else " (no node named to leave out)"
        print(
            f"zeroforge: job {job_id} hung; requeueing it{without} ({count} of cluster.max_hang_requeues={max_requeues})", file=sys.stderr
        )
        print(f"requeue {','.join(hang.nodes)}")
    return HANG_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
