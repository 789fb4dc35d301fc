"""The export is a plain HF model: it loads with Auto classes and computes what training computed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tests.conftest import REPO, read_metrics, run_module

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
    record = read_metrics(run_dir)[0]
    assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "mem_gb"} <= set(record)
    assert record["mfu"] is None and record["grad_norm"] > 0
    assert list((run_dir / "wandb").glob("offline-run-*"))
