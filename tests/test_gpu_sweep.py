"""bench/gpu.py --sweep --dry-run: the runs the GPU sweep would make, planned without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_the_sweep_dry_run_plans_every_variant_within_the_gpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_sweep.json"
    result = subprocess.run(
        [sys.executable, "bench/gpu.py", "--sweep", "--dry-run", "--gpu-memory-gb", "80", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert {r["model"] for r in runs} == {"llama-125m", "llama-1b"}
    variants = {r["variant"] for r in runs}
    assert {"all off (before)", "all on", "all on, loss plain", "all on, AdamW unfused", "all on, compile off"} <= variants
    # torchao is installed (the fp8 extra): the fp8 rows, each planned with its float8 casts.
    assert {"all on + fp8 tensorwise", "all on + fp8 rowwise"} <= variants
    for r in runs:
        assert r["micro_batch"] >= 1 and r["planned_gib"] <= 80, r
        assert f"{r['planned_gib']:.1f}" in result.stdout
    by = {(r["model"], r["variant"]): r for r in runs}
    # The chunked loss needs less memory at the same micro batch, or fits a larger one.
    for model in ("llama-125m", "llama-1b"):
        on, plain = by[model, "all on"], by[model, "all on, loss plain"]
        assert on["micro_batch"] > plain["micro_batch"] or on["planned_gib"] < plain["planned_gib"]
        fp8 = by[model, "all on + fp8 tensorwise"]
        assert fp8["micro_batch"] < on["micro_batch"] or fp8["planned_gib"] >= on["planned_gib"]
    assert (tmp_path / "gpu_sweep.md").read_text().count("planned only") == len(runs)
