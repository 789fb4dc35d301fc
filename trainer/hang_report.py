"""One report of a hang from the ranks' dumps (trainer/watchdog.py): which ranks, on which hosts,
did not reach the collective the others wait in.

`run.dir/hangs/<time>.json` holds the verdict and every dump; `<time>.txt` the readable summary;
the dumps move to `hangs/<time>/`. The lowest live rank writes it; where none could (every rank
killed before the grace ended), `zeroforge launch` and the Slurm job script write it from the
dumps left in `hangs/pending/` (`python -m zeroforge.trainer.hang_report <run.dir>`).

The verdict: a rank that wrote no dump is stuck (stopped, or stuck where Python cannot run). Of
the ranks that dumped, on each process group, those whose last collective (Flight Recorder's
sequence number) is behind the group's newest are stuck too; the collective the others wait in
is that newest one.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

from zeroforge.trainer.watchdog import PENDING, hangs_dir, write_json


def _last(dump: dict[str, Any], group: str) -> Optional[dict[str, Any]]:
    entries = dump["collectives"].get("groups", {}).get(group, {}).get("last", [])
    return entries[-1] if entries else None


def verdict(dumps: list[dict[str, Any]]) -> dict[str, Any]:
    """Which ranks are stuck, where the others wait, from the dumps of the ranks still alive."""
    hosts: list[str] = dumps[0]["hosts"]
    dumped = {d["rank"]: d for d in dumps}
    silent = [r for r in range(len(hosts)) if r not in dumped]
    groups = sorted({g for d in dumps for g in d["collectives"].get("groups", {})})
    behind: set[int] = set()
    # (some rank behind in it, when it started, the collective): where some ranks are behind
    # the others, that group's newest collective is the one they wait in; else the newest of all.
    candidates: list[tuple[bool, int, dict[str, Any]]] = []
    for group in groups:
        listed: list[int] = next(
            (d["collectives"]["groups"][group]["ranks"] for d in dumps if group in d["collectives"].get("groups", {})), []
        )
        members = listed or list(range(len(hosts)))
        lasts = {r: _last(dumped[r], group) for r in members if r in dumped}
        seqs = {r: (e["seq"] if e else 0) for r, e in lasts.items()}
        newest = max(seqs.values(), default=0)
        leader = next((lasts[r] for r, s in seqs.items() if s == newest and lasts[r]), None)
        if leader is None:
            continue
        late = {r for r, s in seqs.items() if s < newest}
        behind |= late
        waiting = sorted(r for r, s in seqs.items() if s == newest)
        candidates.append((bool(late), leader["created_ns"], {**leader, "group": group, "waiting": waiting}))
    waited_in = max(candidates, key=lambda c: (c[0], c[1]))[2] if candidates else None
    stuck = sorted(set(silent) | behind)
    steps = sorted({d["step"] for d in dumps}, key=lambda s: -1 if s is None else s)
    return {
        "stuck_ranks": stuck,
        "stuck_hosts": sorted({hosts[r] for r in stuck}),
        "silent_ranks": silent,
        "collective": waited_in,
        "steps": steps,
        "waited_s": max(d["waited_s"] for d in dumps),
        "hosts": hosts,
    }


def summary(v: dict[str, Any], stamp: str) -> str:
    hosts = v["hosts"]
    where = ", ".join("start-up" if s is None else f"after step {s}" for s in v["steps"])
    lines = [f"zeroforge hang report {stamp}: {len(hosts)} ranks; no progress for {v['waited_s']:.0f} s ({where})"]
    c = v["collective"]
    for r in v["stuck_ranks"]:
        why = "wrote no dump (stopped, or stuck where Python cannot run)" if r in v["silent_ranks"] else "behind the others"
        never = f"; never reached {c['op']} #{c['seq']} on process group {c['group']}" if c else ""
        lines.append(f"stuck: rank {r} on {hosts[r]}: {why}{never}")
    if c:
        waiting = ", ".join(f"{r} ({hosts[r]})" for r in c["waiting"])
        lines.append(f"waiting: ranks {waiting} in {c['op']} #{c['seq']} (process group {c['group']}, input sizes {c['sizes']})")
    lines.append(f"hosts to exclude: {','.join(v['stuck_hosts']) or 'none named'}")
    return "\n".join(lines) + "\n"


def write_report(hangs: Path) -> Optional[Path]:
    """The report of the dumps in `hangs/pending` (its .txt path), or None where there are none."""
    pending = hangs / PENDING
    dumps = [json.loads(p.read_text()) for p in sorted(pending.glob("rank_*.json"))]
    if not dumps:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    v = verdict(dumps)
    text = _save(hangs, stamp, {**v, "dumps": dumps}, summary(v, stamp))
    pending.replace(hangs / stamp)
    return text


def write_rendezvous_report(hangs: Path, missing: list[str], nodes: list[str]) -> Path:
    """The report of a job whose `missing` nodes never started torchrun (launcher/hang_requeue.py)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    text = (
        f"zeroforge hang report {stamp}: {len(nodes)} nodes; {', '.join(missing)} never started torchrun, "
        f"so the rendezvous never formed (cluster.rendezvous_timeout_s)\n"
        f"hosts to exclude: {','.join(missing)}\n"
    )
    return _save(hangs, stamp, {"stuck_hosts": missing, "nodes": nodes, "stage": "rendezvous"}, text)


def _save(hangs: Path, stamp: str, report: dict[str, Any], text: str) -> Path:
    """`<stamp>.json` (with `stuck_hosts`, what the job script excludes) and `<stamp>.txt`."""
    hangs.mkdir(parents=True, exist_ok=True)
    write_json(hangs / f"{stamp}.json", {"time": stamp, **report})
    path = hangs / f"{stamp}.txt"
    path.write_text(text)
    return path


def newest_report(hangs: Path) -> Optional[Path]:
    reports = sorted(hangs.glob("*.txt"))
    return reports[-1] if reports else None


def main(argv: Optional[list[str]] = None) -> None:
    """`python -m zeroforge.trainer.hang_report <run.dir>`: report what the ranks left pending."""
    args = sys.argv[1:] if argv is None else argv
    text = write_report(hangs_dir(args[0]))
    if text is not None:
        print(text.read_text(), end="")


if __name__ == "__main__":
    main()
