"""Resuming on another world size: DeepSpeed's universal checkpoint, converted once and kept.

A ZeRO checkpoint holds each rank's shard of the optimizer state, cut for the world size that
saved it. DeepSpeed's ds_to_universal rewrites it per parameter, which any world size loads
(with "load_universal" in the engine's config). The first resume on another world size converts
<checkpoint>/universal under a temporary name; later ones reuse it. Retention removes it with
its checkpoint. The converter runs with its loads made weights-only (trainer/safe_load.py).
"""

from __future__ import annotations

import logging
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

from zeroforge.trainer.config import ConfigError
from zeroforge.trainer.distributed import DistInfo, barrier, from_rank_zero
from zeroforge.trainer.safe_load import weights_only_loads

log = logging.getLogger("zeroforge")

UNIVERSAL = "universal"


def universal_checkpoint(path: Path, dist: DistInfo) -> Path:
    """path/universal, converted by rank 0 if it is not there yet; every rank must call it."""
    target = path / UNIVERSAL
    problem = None
    if dist.is_main and not target.is_dir():
        try:
            _convert(path, target)
        except (OSError, RuntimeError) as err:
            problem = str(err)
    problem = from_rank_zero(problem, dist)
    barrier()
    if problem:
        raise ConfigError(f"cannot resume from {path} on another world size: converting it to a universal checkpoint failed: {problem}")
    return target


def _convert(path: Path, target: Path) -> None:
    scratch = path / f"{UNIVERSAL}.tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    log.info("converting %s to DeepSpeed's universal checkpoint (once: it is kept in %s)", path, target)
    # A process of its own: the converter runs worker pools and holds every shard in memory.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "zeroforge.trainer.universal",
            "--input_folder",
            str(path),
            "--output_folder",
            str(scratch),
            # Our checkpoints carry no tensor-parallel layout, which is all the converter looks for there.
            "--inject_missing_state",
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"ds_to_universal exited with {result.returncode}: {result.stderr.strip()[-2000:]}")
    (path / "latest_universal").unlink(missing_ok=True)  # the converter's own pointer, beside its output
    scratch.rename(target)


if __name__ == "__main__":
    # DeepSpeed's converter with its arguments, every torch.load in it (and in the worker
    # processes it forks) weights-only.
    with weights_only_loads():
        runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__", alter_sys=True)
