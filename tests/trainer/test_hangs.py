"""A rank that stops making progress ends the job with a report naming it (trainer/watchdog.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import psutil
import pytest

from tests.conftest import REPO, read_metrics
from zeroforge.trainer.watchdog import HANG_EXIT_CODE

HANG_TIMEOUT_S = 10


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


@pytest.fixture(scope="module")
def hung(data_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Hung]:
    """Two 2-rank jobs at once (most of a hang is waiting), one with rank 1 stopped after its
    third step, one with rank 0."""
    base = tmp_path_factory.mktemp("hangs")
    jobs = {stopped: (base / f"rank{stopped}", _start(data_cache, base / f"rank{stopped}")) for stopped in (1, 0)}
    victims: list[psutil.Process] = []
    try:
        stopped_at = {}
        for stopped, (run_dir, launcher) in jobs.items():
            deadline = time.monotonic() + 300
            while not (run_dir / "metrics.jsonl").exists() or len(read_metrics(run_dir)) < 3:
                assert launcher.poll() is None and time.monotonic() < deadline, (
                    f"training did not start: {launcher.communicate()[0][-3000:]}"
                )
                time.sleep(0.5)
            victims.append(_rank_process(launcher, stopped))
            victims[-1].send_signal(signal.SIGSTOP)
            stopped_at[stopped] = time.monotonic()
        results = {}
        for stopped, (run_dir, launcher) in jobs.items():
            output, _ = launcher.communicate(timeout=HANG_TIMEOUT_S + 120)
            results[stopped] = Hung(run_dir, launcher.returncode, output, time.monotonic() - stopped_at[stopped])
        return results
    finally:
        for victim in victims:
            if victim.is_running():
                victim.kill()
        for _, launcher in jobs.values():
            if launcher.poll() is None:
                _kill_tree(launcher)


@pytest.mark.slow
@pytest.mark.parametrize("stopped", [1, 0])
def test_a_stopped_rank_ends_the_job_with_a_report_naming_it(stopped: int, hung: dict[int, Hung]) -> None:
    run_dir, returncode, output, ended = hung[stopped]
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
