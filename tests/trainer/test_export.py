"""The export is a plain HF model: it loads with Auto classes and computes what training computed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tests.conftest import REPO, read_metrics, run_module
from zeroforge.trainer.config import compose_config
from zeroforge.trainer.schedule import lr_factor

pytestmark = pytest.mark.slow


def test_export_loads_and_matches_the_trained_weights(smoke_overrides: list[str], tmp_path: Path) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir = tmp_path / "run"
    result = run_module("zeroforge.trainer.train", [*smoke_overrides, "deepspeed=zero2", "logging.wandb.mode=offline"], cwd=REPO)
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


def test_export_entry_point_turns_a_zero3_checkpoint_into_the_same_model(zero3_smoke_run: Path, tmp_path: Path) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from zeroforge.trainer.consolidate import checkpoint_weights

    # A copy: the default output lands in the run directory, which other tests read at the same time.
    run = tmp_path / "run"
    shutil.copytree(zero3_smoke_run, run)
    step_dir = run / "checkpoints" / "step_0000020"
    result = run_module("zeroforge.trainer.export", [f"checkpoint={step_dir}"], cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = run / "export_step_0000020"
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin")) and not out.with_suffix(".tmp").exists()
    assert json.loads((out / "zeroforge.json").read_text())["step"] == 20

    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    trained = AutoModelForCausalLM.from_pretrained(zero3_smoke_run / "export", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["import os\nimport sys\n", "def main(argv):\n    return 0\n"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(exported(**batch).logits, trained(**batch).logits)

    # Our consolidation is DeepSpeed's own (zero_to_fp32), read without unpickling arbitrary objects.
    ours = dict(checkpoint_weights(zero3_smoke_run / "checkpoints" / "step_0000010").tensors())
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(zero3_smoke_run / "checkpoints"), tag="step_0000010")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    # `latest` through the checkpoints directory, in bf16, to a chosen place.
    bf16 = tmp_path / "bf16"
    args = [f"checkpoint={zero3_smoke_run / 'checkpoints'}", f"export.output={bf16}", "export.precision=bf16"]
    assert run_module("zeroforge.trainer.export", args, cwd=REPO).returncode == 0
    full, half = load_file(out / "model.safetensors"), load_file(bf16 / "model.safetensors")
    assert all(torch.equal(half[k], full[k].to(torch.bfloat16)) for k in full)

    missing = run_module("zeroforge.trainer.export", [], cwd=REPO)
    assert missing.returncode == 2 and "no checkpoint to export: expected checkpoint=" in missing.stderr


# ZeRO-3 is the shared 2-rank run above; ZeRO 0-2 keep the whole module in one file, in the
# precision training ran in (bf16 here for ZeRO-2).
@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (1, "fp32"), (2, "bf16")])
def test_checkpoints_of_every_stage_load_as_the_export(stage: int, precision: str, data_cache: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from zeroforge.trainer.inference_model import load_from_checkpoint

    run_dir = tmp_path / "run"
    args = [
        "experiment=smoke",
        f"data.cache_dir={data_cache}",
        f"run.dir={run_dir}",
        "logging.wandb.mode=disabled",
        f"deepspeed=zero{stage}",
        f"train.precision={precision}",
        "train.steps=3",
        "optim.warmup_steps=1",
        "eval.every=0",
        "checkpoint.every=0",
    ]
    result = run_module("zeroforge.trainer.train", args, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    loaded = load_from_checkpoint(run_dir / "checkpoints", "cpu")
    export = load_file(run_dir / "export" / "model.safetensors")
    state = loaded.model.state_dict()
    assert loaded.step == 3 and loaded.model.dtype == getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[precision])
    assert all(torch.equal(state[k], export[k]) for k in export)
