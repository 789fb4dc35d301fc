"""The progress line of interactive runs: its ETA, when it is shown, and log lines printed above it."""

from __future__ import annotations

import io
import logging
import re
from typing import Iterator

import pytest

from zeroforge.trainer.log import setup_logging
from zeroforge.trainer.progress import NoProgress, ProgressBar, eta_seconds, format_duration, open_progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_eta_is_the_mean_pace_of_this_process_times_the_steps_left() -> None:
    assert eta_seconds(step=10, total=100, start_step=0, elapsed_s=5.0) == pytest.approx(45.0)
    # Resumed at step 50: only the 10 steps run here set the pace.
    assert eta_seconds(step=60, total=100, start_step=50, elapsed_s=20.0) == pytest.approx(80.0)
    assert eta_seconds(step=100, total=100, start_step=0, elapsed_s=50.0) == 0.0
    assert eta_seconds(step=50, total=100, start_step=50, elapsed_s=3.0) is None


def test_durations_read_as_clock_time() -> None:
    assert [format_duration(s) for s in (None, 0.4, 59.6, 61, 3600 * 26 + 62)] == ["?", "0:00", "1:00", "1:01", "26:01:02"]


def test_a_bar_only_for_rank_zero_at_a_terminal_outside_slurm() -> None:
    assert isinstance(open_progress(0, 10, 0, stream=io.StringIO(), environ={}), NoProgress)  # a file or a pipe
    assert isinstance(open_progress(1, 10, 0, stream=Terminal(), environ={}), NoProgress)
    assert isinstance(open_progress(0, 10, 0, stream=Terminal(), environ={"SLURM_JOB_ID": "7"}), NoProgress)
    bar = open_progress(0, 10, 0, stream=Terminal(), environ={})
    assert isinstance(bar, ProgressBar)
    bar.close()


@pytest.fixture
def root_logging() -> Iterator[None]:
    """setup_logging replaces the root handlers (pytest's among them): put them back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers, root.level = handlers, level


def test_the_bar_shows_step_rate_and_eta_with_log_lines_above_it(monkeypatch: pytest.MonkeyPatch, root_logging: None) -> None:
    terminal = Terminal()
    monkeypatch.setattr("sys.stdout", terminal)
    setup_logging(0)
    console = logging.getLogger().handlers
    bar = open_progress(0, 20, 0, environ={})
    bar.update(1, 1234.0)
    logging.getLogger("zeroforge").info("step 1 | loss 8.0")
    bar.update(2, 1234.0)
    bar.close()
    assert logging.getLogger().handlers == console  # the redirect ends with the bar
    out = terminal.getvalue()
    # A log record is a line of its own, not written into the middle of the bar.
    lines = re.split(r"[\r\n]", out)
    assert any(line.endswith("INFO zeroforge: step 1 | loss 8.0") and not re.search(r"step \d+/20", line) for line in lines)
    last = re.split(r"[\r\n]", out.rstrip("\n"))[-1]
    assert re.fullmatch(r"step 2/20 \|.{20}\| 1,234 tokens/s \| ETA \d+:\d\d", last), last
