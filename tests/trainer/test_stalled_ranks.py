"""Two ranks, two faults, seen from outside: a rank slowed is named as the straggler
(trainer/stragglers.py), a stopped one ends the job with a report naming it (trainer/watchdog.py).

One pair of 2-rank jobs serves both (most of a hang is waiting): one runs NORMAL_STEPS steps
untouched (no rank may be named a straggler) and then has rank 0 stopped; in the other, rank 1 is
slowed from its 10th step until it is named, and then stopped for good."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Sequence

import psutil
import pytest

from tests.conftest import REPO, read_metrics
from zeroforge.trainer.watchdog import HANG_EXIT_CODE

pytestmark = pytest.mark.slow

HANG_TIMEOUT_S = 10
EVERY = 5
NORMAL_STEPS = 200
INTERVALS = 3


def _rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    """The trainer of `rank`: the process that runs `-m zeroforge.trainer.train` (torchrun's agent
    names that module among its arguments too, and may carry a RANK from the test's environment)."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            cmdline = child.cmdline()
            module = cmdline[cmdline.index("-m") + 1] if "-m" in cmdline else None
            if module == "zeroforge.trainer.train" and child.environ().get("RANK") == str(rank):
                return child
        except (psutil.NoSuchProcess, IndexError):
            continue
    raise AssertionError(f"no rank {rank} among the launcher's processes")


def _kill_tree(launcher: subprocess.Popen) -> None:
    """A job that did not end: its torchrun and ranks go with it (they would train on for hours)."""
    try:
        processes = [*psutil.Process(launcher.pid).children(recursive=True), psutil.Process(launcher.pid)]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


class Hung(NamedTuple):
    run_dir: Path
    returncode: int
    output: str
    ended_s: float  # from the SIGSTOP to the launcher's exit


def _start(data_cache: Path, run_dir: Path, extra: Sequence[str] = ()) -> subprocess.Popen:
    """A 2-rank `zeroforge launch` that trains until stopped (or for `extra`'s train.steps)."""
    args = [
        "experiment=smoke",
        f"data.cache_dir={data_cache}",
        f"run.dir={run_dir}",
        "logging.wandb.mode=disabled",
        "cluster.nproc_per_node=2",
        "train.steps=100000",
        "eval.every=0",
        "checkpoint.every=0",
        "launcher.harness=false",
        f"cluster.hang_timeout_s={HANG_TIMEOUT_S}",
        *extra,
    ]
    cmd = [sys.executable, "-m", "zeroforge.launcher", *args]
    # Another test's process group may have left its RANK and WORLD_SIZE in this worker's environment.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


class Job(NamedTuple):
    run_dir: Path
    returncode: int
    output: str
    stopped: int  # the rank stopped for good
    slowed_at: int  # the step at which rank 1's duty cycle began; 0: never slowed
    ended_s: float  # from the SIGSTOP to the launcher's exit


def _finish(launcher: subprocess.Popen) -> tuple[str, float]:
    """The launcher's output and the seconds from now (its rank's SIGSTOP) to its exit."""
    stopped_at = time.monotonic()
    output, _ = launcher.communicate(timeout=HANG_TIMEOUT_S + 120)
    return output, time.monotonic() - stopped_at


def _duty_cycle(process, stop: threading.Event, period_s: float = 0.08) -> None:
    """Stopped for 7/8 of every period. On the 2-core test machine, shared with the other tests, the
    job's steps then take 2 to 3.5 times as long (a rank stopped part of the time gets more of the
    cores while it runs, so a milder cycle hardly slows it there)."""
    while True:
        process.send_signal(signal.SIGSTOP)
        if stop.wait(period_s * 7 / 8):
            return  # stopped for good
        process.send_signal(signal.SIGCONT)
        time.sleep(period_s / 8)


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return max((r["step"] for r in read_metrics(run_dir) if "loss" in r), default=0) if path.exists() else 0


def _wait_for_step(run_dir: Path, launcher: subprocess.Popen, step: int) -> int:
    deadline = time.monotonic() + 300
    while _last_step(run_dir) < step:
        assert launcher.poll() is None and time.monotonic() < deadline, f"no step {step}: {launcher.communicate()[0][-3000:]}"
        time.sleep(0.2)
    return _last_step(run_dir)


def _records(run_dir: Path) -> int:
    return len([r for r in read_metrics(run_dir) if "own_time_s_max" in r])


@pytest.fixture(scope="module")
def jobs(data_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job]:
    base = tmp_path_factory.mktemp("stalled")
    common = [f"logging.every={EVERY}", f"logging.straggler_intervals={INTERVALS}"]
    normal = _start(data_cache, base / "normal", common)
    slowed = _start(data_cache, base / "slowed", common)
    stop = threading.Event()
    victims: list[psutil.Process] = []
    # The launchers are killed before the pool waits for their outputs, where something fails.
    with ThreadPoolExecutor(2) as pool:
        try:
            slowed_at = _wait_for_step(base / "slowed", slowed, 10)
            victims.append(_rank_process(slowed, 1))
            cycle = threading.Thread(target=_duty_cycle, args=(victims[-1], stop), daemon=True)
            cycle.start()
            deadline = time.monotonic() + 60
            while not any(r.get("stragglers") for r in read_metrics(base / "slowed")) and time.monotonic() < deadline:
                time.sleep(0.5)
            stop.set()  # the cycle ends with rank 1 stopped
            cycle.join()
            slowed_end = pool.submit(_finish, slowed)

            _wait_for_step(base / "normal", normal, NORMAL_STEPS)
            victims.append(_rank_process(normal, 0))
            victims[-1].send_signal(signal.SIGSTOP)
            normal_end = pool.submit(_finish, normal)
            (slowed_output, slowed_s), (normal_output, normal_s) = slowed_end.result(), normal_end.result()
        finally:
            stop.set()
            for victim in victims:
                if victim.is_running():
                    victim.kill()
            for launcher in (normal, slowed):
                if launcher.poll() is None:
                    _kill_tree(launcher)
    return {
        "slowed": Job(base / "slowed", slowed.returncode, slowed_output, 1, slowed_at, slowed_s),
        "normal": Job(base / "normal", normal.returncode, normal_output, 0, 0, normal_s),
    }


def test_a_slowed_rank_is_named_within_a_few_intervals(jobs: dict[str, Job]) -> None:
    run = jobs["slowed"]
    records = [r for r in read_metrics(run.run_dir) if "own_time_s_max" in r]
    named = [r for r in records if r["stragglers"]]
    assert named, [(r["step"], r["straggler_ratio"]) for r in records]
    first = named[0]
    assert first["stragglers"].startswith("1 (") and first["slowest_rank"] == 1, first
    # Named after INTERVALS slow intervals, allowing one for the interval the cycle began in and two more.
    assert first["step"] <= run.slowed_at + EVERY * (INTERVALS + 3), (run.slowed_at, first)
    assert f"straggler: rank(s) {first['stragglers']} took over 1.5x the median" in run.output
    # The other rank never was.
    assert all(r["stragglers"].startswith("1 (") for r in named)


def test_no_rank_is_named_in_a_normal_run(jobs: dict[str, Job]) -> None:
    records = [r for r in read_metrics(jobs["normal"].run_dir) if "own_time_s_max" in r]
    # Step 1, then every EVERY steps, until (and perhaps a little past) rank 0's stop.
    assert [r["step"] for r in records if r["step"] <= NORMAL_STEPS] == [1, *range(EVERY, NORMAL_STEPS + 1, EVERY)]
    assert not [r for r in records if r["stragglers"]], [(r["step"], r["straggler_ratio"]) for r in records]
    assert "straggler:" not in jobs["normal"].output


@pytest.mark.parametrize("job", ["slowed", "normal"])
def test_a_stopped_rank_ends_the_job_with_a_report_naming_it(job: str, jobs: dict[str, Job]) -> None:
    run_dir, returncode, output, stopped, _, ended = jobs[job]
    assert returncode == HANG_EXIT_CODE, output[-4000:]
    assert ended < HANG_TIMEOUT_S + 60, ended
    (report,) = (run_dir / "hangs").glob("*.json")
    verdict = json.loads(report.read_text())
    live = 1 - stopped
    assert verdict["stuck_ranks"] == verdict["silent_ranks"] == [stopped]
    assert verdict["stuck_hosts"] == [os.uname().nodename]
    # The live rank waits in a collective the stopped one never reached, named by Flight Recorder.
    collective = verdict["collective"]
    assert collective["op"].startswith("gloo:") and collective["waiting"] == [live] and collective["seq"] > 0
    (dump,) = verdict["dumps"]
    assert dump["rank"] == live and dump["waited_s"] >= HANG_TIMEOUT_S and dump["step"] >= 3
    # Its main thread's stack: from the training loop down to the collective it waits in.
    main = next(stack for name, stack in dump["stacks"].items() if name.startswith("MainThread"))
    assert ", in train\n" in main and "distributed_c10d.py" in main.splitlines()[-2], main[-2000:]
    text = report.with_suffix(".txt").read_text()
    assert f"stuck: rank {stopped} on {os.uname().nodename}: wrote no dump" in text and f"never reached {collective['op']}" in text
    assert text.strip() in output  # the launcher printed it
    assert (run_dir / "hangs" / report.stem / f"rank_{live}.json").exists() and not (run_dir / "hangs" / "pending").exists()
