"""Continued pre-training: model.init_from starts a new run from an export's weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, exact_overrides, read_metrics, run_module, train_losses


def test_a_run_continues_from_an_exports_weights_with_a_fresh_optimizer(single_process_run: Path, data_cache: Path, tmp_path: Path) -> None:
    """Under ZeRO-2: the first loss is the exported model's own on the same global batch."""
    from transformers import AutoModelForCausalLM

    from zeroforge.data.build import open_data
    from zeroforge.trainer.config import compose_config
    from zeroforge.trainer.engine import causal_lm_loss

    export = single_process_run / "export"
    run_dir = tmp_path / "continued"
    args = [*exact_overrides(data_cache, run_dir, 2), "train.steps=11", f"model.init_from={export}"]
    result = run_module("zeroforge.trainer.train", args, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"weights from {export}" in result.stdout
    fresh, continued = train_losses(single_process_run), train_losses(run_dir)

    cfg = compose_config(args)
    source = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    micro_batches = open_data(cfg.data).loader(cfg.seed, cfg.train.global_batch_size, cfg.train.micro_batch_size, 0, 1).next_batch()
    with torch.no_grad():
        expected = torch.stack([causal_lm_loss(source, batch) for batch in micro_batches]).mean().item()
    assert continued[0] == pytest.approx(expected, rel=0, abs=1e-5)
    # The first step sees the trained weights: far below a fresh model's loss, and below any loss of
    # the first half of the run that trained them.
    assert continued[0] < fresh[0] - 1.0
    assert continued[0] < min(fresh[:10])
    first = read_metrics(run_dir)[0]
    assert first["step"] == 1 and first["lr"] == read_metrics(single_process_run)[0]["lr"]  # warmup starts again
    assert (run_dir / "export" / "model.safetensors").exists()


def test_an_init_from_of_another_shape_is_refused_before_training(single_process_run: Path, data_cache: Path, tmp_path: Path) -> None:
    result = run_module(
        "zeroforge.trainer.train",
        [*exact_overrides(data_cache, tmp_path / "run", 2), "model.num_layers=3", f"model.init_from={single_process_run / 'export'}"],
        cwd=REPO,
    )
    assert result.returncode == 2
    assert "does not fit this run: num_hidden_layers:" in result.stderr and "has 4, model=tiny has 3" in result.stderr
    assert "step 1 |" not in result.stdout
