"""One prepare worker, watched: why each worker spends more CPU per token when many run at once.

    python bench/prepare_profile.py [--workers 1 16] [--documents 1500]

The open question of bench/RESULTS.md (prepare's scaling): at 16 workers on a 16-core machine each
worker spent about twice the CPU per token that a lone worker does. For each worker count this
runs bench/data.py's prepare (the same corpus, one copy per worker) and watches its first
spawned worker (with one worker, the process itself, where prepare then tokenizes; its CPU time
also holds the reading and writing, about 0.3 s in the 2-core figures): with `perf stat -p` where perf is installed and allowed (cycles, instructions,
cache misses, context switches, migrations, page faults: IPC and clock rate say whether the
core got slower or the work grew), and always from /proc: the worker's CPU time, page faults,
voluntary and involuntary context switches and the CPUs it ran on, the machine's busy, steal
and iowait shares, and the mean CPU clock /proc/cpuinfo reports. Prints a table and writes
bench/results/prepare_profile.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PERF_EVENTS = "task-clock,cycles,instructions,cache-references,cache-misses,context-switches,cpu-migrations,page-faults"


def _bench_data():
    """bench/data.py as a module (bench/ is no package, and `data` would name the repo's data/)."""
    spec = importlib.util.spec_from_file_location("bench_data", Path(__file__).with_name("data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _is_worker(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()  # not the resource tracker
    except OSError:
        return False


def _proc_sample(pid: int) -> dict:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    tick = os.sysconf("SC_CLK_TCK")
    return {
        "cpu_s": (int(stat[11]) + int(stat[12])) / tick,
        "user_s": int(stat[11]) / tick,
        "minor_faults": int(stat[7]),
        "major_faults": int(stat[9]),
        "cpu": int(stat[36]),
        "voluntary_switches": int(status["voluntary_ctxt_switches"]),
        "involuntary_switches": int(status["nonvoluntary_ctxt_switches"]),
    }


def _machine_sample() -> tuple[list[int], float]:
    """(/proc/stat's cpu line, mean MHz over /proc/cpuinfo's cpus)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("cpu MHz")]
    return fields, sum(mhz) / len(mhz) if mhz else float("nan")


def _perf_usable() -> bool:
    if shutil.which("perf") is None:
        return False
    probe = subprocess.run(["perf", "stat", "-x,", "-e", "instructions", "true"], capture_output=True, text=True)
    return probe.returncode == 0 and "not supported" not in probe.stderr and "<not counted>" not in probe.stderr


class WorkerWatch(threading.Thread):
    """Finds this process's first spawned worker, samples it until it exits (and runs perf on it)."""

    def __init__(self, use_perf: bool, workers: int):
        super().__init__(daemon=True)
        # One worker tokenizes in this process (data/encode.py): then this process is watched.
        self.use_perf, self.pid, self.samples, self.cpus = use_perf, os.getpid() if workers == 1 else None, [], set()
        self.machine: list[tuple[list[int], float]] = []
        self.perf_output = ""
        self.stop = threading.Event()

    def run(self) -> None:
        while self.pid is None and not self.stop.is_set():
            self.pid = next((c for c in _children(os.getpid()) if _is_worker(c)), None)
            time.sleep(0.02)
        if self.pid is None:
            return
        perf = None
        if self.use_perf:
            perf = subprocess.Popen(
                ["perf", "stat", "-x,", "-e", PERF_EVENTS, "-p", str(self.pid)],
                stderr=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                text=True,
            )
        while not self.stop.is_set():
            try:
                sample = _proc_sample(self.pid)
            except (OSError, KeyError, IndexError):
                break  # the worker is gone
            self.samples.append(sample)
            self.cpus.add(sample["cpu"])
            self.machine.append(_machine_sample())
            time.sleep(0.1)
        if perf is not None:
            perf.terminate()
            self.perf_output = perf.communicate(timeout=10)[1]


def _perf_counters(text: str) -> dict:
    counters = {}
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[0].replace(".", "", 1).isdigit():
            counters[parts[2]] = float(parts[0])
    return counters


def profile(bench, texts: list[str], tokenizer: Path, work: Path, workers: int, use_perf: bool) -> dict:
    corpus = bench.write_jsonl(texts, workers, work / f"corpus-{workers}.jsonl")
    watch = WorkerWatch(use_perf, workers)
    watch.start()
    figures = bench.prepare_rate(corpus, tokenizer, work, workers)
    watch.stop.set()
    watch.join(timeout=15)
    if not watch.samples:
        return {"workers": workers, "prepare": figures, "error": "no worker was seen"}
    # Differences from the first sample: the watched process's earlier life (imports, for one
    # worker this process's set-up) is not part of tokenizing.
    first, (m0, mhz0), (m1, _) = watch.samples[0], watch.machine[0], watch.machine[-1]
    last = {k: v - first[k] for k, v in watch.samples[-1].items() if k != "cpu"}
    delta = [b - a for a, b in zip(m0, m1)]
    total = sum(delta) or 1
    # /proc/stat: user nice system idle iowait irq softirq steal ...
    busy = (total - delta[3] - delta[4]) / total
    tokens_per_worker = figures["tokens"] / workers  # each worker tokenizes one copy's worth
    result = {
        "workers": workers,
        "prepare": figures,
        "worker_pid": watch.pid,
        "worker_cpu_s": last["cpu_s"],
        "worker_user_share": last["user_s"] / last["cpu_s"] if last["cpu_s"] else None,
        "worker_cpu_s_per_mtoken": last["cpu_s"] / tokens_per_worker * 1e6,
        "worker_minor_faults_per_mtoken": last["minor_faults"] / tokens_per_worker * 1e6,
        "worker_voluntary_switches": last["voluntary_switches"],
        "worker_involuntary_switches": last["involuntary_switches"],
        "worker_cpus_seen": len(watch.cpus),
        "machine_busy_share": busy,
        "machine_steal_share": delta[7] / total if len(delta) > 7 else None,
        "machine_iowait_share": delta[4] / total,
        "mean_cpu_mhz": sum(m for _, m in watch.machine) / len(watch.machine),
        "idle_cpu_mhz": mhz0,
    }
    if use_perf:
        counters = _perf_counters(watch.perf_output)
        result["perf"] = counters
        if counters.get("cycles") and counters.get("instructions"):
            result["ipc"] = counters["instructions"] / counters["cycles"]
            result["ghz"] = counters["cycles"] / (counters.get("task-clock", float("nan")) * 1e6)
            result["instructions_per_token"] = counters["instructions"] / tokens_per_worker
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--documents", type=int, default=1500)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "prepare_profile.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    bench = _bench_data()
    use_perf = _perf_usable()
    print(f"machine: {bench._machine()}; perf: {'used' if use_perf else 'not installed or no hardware events: /proc only'}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        texts, tokenizer = bench.corpus_and_tokenizer(work, args.documents)
        for workers in args.workers:
            rows.append(profile(bench, texts, tokenizer, work, workers, use_perf))
    print(
        f"\n{'workers':>8}{'tokens/s':>12}{'CPU s/Mtok (one worker)':>25}{'invol. switches':>17}{'CPUs run on':>13}"
        f"{'busy':>7}{'steal':>7}{'MHz':>7}{'IPC':>6}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['workers']:>8}  {r['error']}")
            continue
        steal = "n/a" if r["machine_steal_share"] is None else f"{r['machine_steal_share']:.0%}"
        print(
            f"{r['workers']:>8}{r['prepare']['tokens_per_s']:>12,.0f}{r['worker_cpu_s_per_mtoken']:>25.2f}"
            f"{r['worker_involuntary_switches']:>17}{r['worker_cpus_seen']:>13}{r['machine_busy_share']:>7.0%}{steal:>7}"
            f"{r['mean_cpu_mhz']:>7.0f}{r.get('ipc', float('nan')):>6.2f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": bench._machine(), "perf": use_perf, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
