"""The export is a plain HF model: it loads with Auto classes and computes what training computed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from launcher.config import compose_config
from tests.conftest import REPO, read_metrics, run_module
from trainer.schedule import lr_factor

pytestmark = pytest.mark.slow


def test_export_loads_and_matches_the_trained_weights(smoke_overrides: list[str], tmp_path: Path) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir = tmp_path / "run"
    result = run_module("trainer.train", [*smoke_overrides, "deepspeed=zero2", "logging.wandb.mode=offline"], cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    export = run_dir / "export"
    assert (export / "model.safetensors").exists() and not list(export.glob("*.bin"))

    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert len(tokenizer) <= model.config.vocab_size

    # The trained weights, read back independently from the DeepSpeed checkpoint by DeepSpeed's
    # own consolidation, into a fresh model of the same config.
    trained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(export)).eval()
    state = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag="step_0000020")
    missing, unexpected = trained.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)

    batch = tokenizer(["import os\nimport sys\n", "def main(argv):\n    return 0\n"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, trained(**batch).logits, rtol=0, atol=1e-5)

    # Metrics carry the promised fields; wandb ran offline in the run directory.
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    record = records[0]
    assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "mem_gb"} <= set(record)
    assert record["mfu"] is None and record["grad_norm"] > 0
    # The lr the first step used (the first warmup step), and tokens counted per global batch.
    cfg = compose_config(smoke_overrides)
    assert record["lr"] == pytest.approx(cfg.optim.lr * lr_factor(cfg.optim, cfg.train.steps)(0))
    per_step = cfg.train.global_batch_size * cfg.data.seq_len
    assert [r["tokens"] for r in records[:3]] == [per_step, 2 * per_step, 3 * per_step]
    assert any("val_loss" in r for r in read_metrics(run_dir))
    assert list((run_dir / "wandb").glob("offline-run-*"))
