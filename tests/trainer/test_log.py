"""Rank-aware logging on two real ranks: rank 0 prints info, every rank its warnings, tagged, and
a warning every rank reaches alike once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

SCRIPT = """
import logging, os
from zeroforge.trainer.log import SAME_ON_EVERY_RANK, setup_logging

rank = int(os.environ["RANK"])
setup_logging(rank)
log = logging.getLogger("zeroforge")
log.info("info from rank %d", rank)
log.warning("warning from rank %d", rank)
log.warning("reduced over the ranks, seen by rank %d", rank, extra=SAME_ON_EVERY_RANK)
"""


def test_rank_one_prints_its_warnings_tagged_and_no_info(tmp_path: Path) -> None:
    script = tmp_path / "log_ranks.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.endswith("[rank 1] WARNING zeroforge: warning from rank 1") for line in lines), result.stdout
    assert any(line.endswith(" WARNING zeroforge: warning from rank 0") and "[rank" not in line for line in lines), result.stdout
    assert any(line.endswith(" INFO zeroforge: info from rank 0") for line in lines), result.stdout
    assert "info from rank 1" not in result.stdout + result.stderr
    # A warning every rank reaches alike is printed once, by rank 0.
    assert "reduced over the ranks, seen by rank 0" in result.stdout and "seen by rank 1" not in result.stdout
