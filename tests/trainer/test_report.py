"""`zeroforge report`: the curves of a real run as a PNG, and a summary with the right numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, read_metrics, run_module
from zeroforge.trainer.config import ConfigError, compose_config
from zeroforge.trainer.report import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run_in_progress(single_process_run: Path, tmp_path: Path) -> Path:
    """The smoke run's records, two validation records, and a last line cut off mid-write."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(single_process_run / "metrics.jsonl", run_dir / "metrics.jsonl")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 10, "val_loss": 6.5, "val_ppl": 665.1}) + "\n")
        f.write(json.dumps({"step": 20, "val_loss": 6.25, "val_ppl": 518.0}) + "\n")
        f.write('{"step": 21, "loss": 6.1, "lr"')
    return run_dir


def test_report_of_a_run_in_progress(single_process_run: Path, tmp_path: Path) -> None:
    run_dir = _run_in_progress(single_process_run, tmp_path)
    result = run_module("zeroforge.trainer.report", [f"run.dir={run_dir}"], cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    png = (run_dir / "report.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 20_000
    from PIL import Image

    with Image.open(run_dir / "report.png") as image:
        assert image.size == (1500, 800)
    last = [r for r in read_metrics(single_process_run) if "loss" in r][-1]
    assert last["step"] == 20
    assert f"last step 20 | last loss {last['loss']:.4f} | best val loss 6.2500 (step 20)" in result.stdout


def test_summary_numbers(single_process_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = _run_in_progress(single_process_run, tmp_path)
    report(compose_config([f"run.dir={run_dir}"]))
    train = [r for r in read_metrics(single_process_run) if "loss" in r]
    mean_tps = sum(r["tokens_per_s"] for r in train[1:]) / (len(train) - 1)
    out = capsys.readouterr().out
    assert f"mean tokens/s {mean_tps:,.0f}" in out
    assert "mean MFU n/a" in out  # no peak is known on the CPU


def test_a_damaged_record_or_missing_run_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="metrics.jsonl does not exist"):
        report(compose_config([f"run.dir={tmp_path}"]))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 8.0}\nnot json\n{"step": 2, "loss": 7.0}\n')
    with pytest.raises(ConfigError, match="line 2 is not a JSON record"):
        report(compose_config([f"run.dir={tmp_path}"]))
