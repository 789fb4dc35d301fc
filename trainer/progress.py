"""A progress line with ETA for interactive runs: rank 0, stdout a terminal, not a Slurm job.

Everywhere else (other ranks, files, pipes, Slurm logs) the plain log lines are the whole output:
a redrawn line would only fill a log file with carriage returns.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import ExitStack
from typing import Any, Mapping, Optional, TextIO, Union


def eta_seconds(step: int, total: int, start_step: int, elapsed_s: float) -> Optional[float]:
    """Time left at the mean pace of the steps this process ran (a resumed run's earlier steps
    took no time here), evaluation and checkpoints included since they recur; None before the first."""
    done = step - start_step
    if done <= 0:
        return None
    return elapsed_s / done * (total - step)


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class NoProgress:
    def update(self, step: int, tokens_per_s: Optional[float]) -> None:
        pass

    def close(self) -> None:
        pass


def _size(stream: TextIO) -> dict[str, Any]:
    """tqdm follows the terminal's size, except where one reports 0 columns or lines (some IDE
    consoles, `script`): tqdm would draw nothing there, so it gets a fixed 100 x 24."""
    try:
        size = os.get_terminal_size(stream.fileno())
        if size.columns and size.lines:
            return {"dynamic_ncols": True}
    except (OSError, ValueError):  # no file descriptor behind the stream
        pass
    return {"ncols": 100, "nrows": 24}


class ProgressBar:
    """One redrawn line (tqdm); while it is open, log records print above it through tqdm.write
    instead of being written into the middle of it."""

    def __init__(self, stream: TextIO, total: int, start_step: int):
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.total, self.start_step = total, start_step
        self.started = time.perf_counter()
        self._stack = ExitStack()
        self._bar = self._stack.enter_context(
            tqdm(total=total, initial=start_step, file=stream, bar_format="step {n}/{total} |{bar:20}| {desc}", **_size(stream))
        )
        self._stack.enter_context(logging_redirect_tqdm())

    def update(self, step: int, tokens_per_s: Optional[float]) -> None:
        eta = eta_seconds(step, self.total, self.start_step, time.perf_counter() - self.started)
        rate = "? tokens/s" if tokens_per_s is None else f"{tokens_per_s:,.0f} tokens/s"
        self._bar.set_description_str(f"{rate} | ETA {format_duration(eta)}", refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        self._stack.close()  # the logging redirect first, then the bar's last draw and newline


def open_progress(
    rank: int, total: int, start_step: int, stream: Optional[TextIO] = None, environ: Mapping[str, str] = os.environ
) -> Union[ProgressBar, NoProgress]:
    """The progress sink for this process: a bar on rank 0 at a terminal outside Slurm, else nothing."""
    stream = sys.stdout if stream is None else stream
    if rank == 0 and stream.isatty() and "SLURM_JOB_ID" not in environ:
        return ProgressBar(stream, total, start_step)
    return NoProgress()
