"""A process's peak host memory is its own, whatever the process that started it held."""

from __future__ import annotations

import subprocess
import sys

from zeroforge.trainer.host_memory import peak_rss_bytes, rss_bytes

MIB = 2**20


def test_a_started_process_does_not_inherit_its_parents_peak() -> None:
    # The exported checkpoint's bound is checked in a process that pytest starts after hundreds of
    # tests: getrusage would hand it pytest's high-water mark.
    held = bytearray(600 * MIB)
    held[::4096] = b"\x01" * len(held[::4096])  # touched: resident
    parent_peak = peak_rss_bytes()
    del held
    code = "from zeroforge.trainer.host_memory import peak_rss_bytes; print(peak_rss_bytes())"
    child_peak = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert parent_peak >= 600 * MIB
    assert child_peak < parent_peak - 400 * MIB, (child_peak >> 20, parent_peak >> 20)


def test_the_peak_follows_what_the_process_touches() -> None:
    before = peak_rss_bytes()
    held = bytearray(300 * MIB)
    held[::4096] = b"\x01" * len(held[::4096])
    assert rss_bytes() >= 300 * MIB
    assert peak_rss_bytes() >= max(before, rss_bytes())
    del held
