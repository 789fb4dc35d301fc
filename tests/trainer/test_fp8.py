"""train.precision=fp8: torchao's float8 linear layers, on the CPU for their numerics."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, read_metrics, run_module, train_losses
from tests.trainer.test_model_switches import BLOCKS, compiled_graphs
from zeroforge.trainer.config import ConfigError, compose_config
from zeroforge.trainer.validate import job_topology, validate

# The smallest decoder whose linear layers the FP8 GEMM takes (every dimension a multiple of 16).
SMALL = [
    "model.hidden_size=64",
    "model.num_heads=2",
    "model.num_kv_heads=2",
    "model.intermediate_size=128",
    "model.num_layers=2",
    "train.micro_batch_size=4",
    "train.global_batch_size=4",
    "data.seq_len=32",
]
STEPS = 100


def _train(data_cache: Path, run_dir: Path, precision: str, *extra: str, env: dict[str, str] | None = None) -> str:
    args = [
        "experiment=smoke",
        f"data.cache_dir={data_cache}",
        f"run.dir={run_dir}",
        "logging.wandb.mode=disabled",
        *SMALL,
        f"train.precision={precision}",
        f"train.steps={STEPS}",
        "checkpoint.every=50",
        f"eval.every={STEPS}",
        "eval.batch_size=4",
        *extra,
    ]
    result = run_module("zeroforge.trainer.train", args, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def runs(data_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    """100 steps in fp8 under ZeRO-3 and in bf16; the fp8 run resumed from its step 50 in a
    directory of its own; its first 20 steps under ZeRO-2 with regional compile and activation
    checkpointing (DeepSpeed's ZeRO-3 hooks break compiled graphs)."""
    base = tmp_path_factory.mktemp("fp8")
    log = _train(data_cache, base / "fp8", "fp8", "deepspeed=zero3")
    _train(data_cache, base / "bf16", "bf16")
    step_50 = base / "fp8" / "checkpoints" / "step_0000050"
    resumed_log = _train(data_cache, base / "resumed", "fp8", "deepspeed=zero3", f"checkpoint.resume={step_50}")
    wrapped = ["model.compile=regional", "model.activation_checkpointing=true", "train.exit_interval=20"]
    wrapped_log = _train(data_cache, base / "wrapped", "fp8", *wrapped, env={**os.environ, "TORCH_LOGS": "dynamo"})
    return {
        "fp8": base / "fp8",
        "bf16": base / "bf16",
        "resumed": base / "resumed",
        "wrapped": base / "wrapped",
        "log": log,
        "resumed_log": resumed_log,
        "wrapped_log": wrapped_log,
    }


def test_fp8_converts_the_decoder_linears_and_ends_within_3_percent_of_bf16(runs: dict) -> None:
    log = runs["log"]
    # Every decoder linear layer, and not the output layer (nor the embeddings, not linear layers).
    projections = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    listed = ", ".join(f"model.layers.*.{p} x 2" for p in projections)
    assert f"fp8 (tensorwise recipe): 14 linear layers in float8: {listed}" in log
    assert "fp8: kept in bf16: lm_head (the output layer)" in log
    assert "with no speed" in log and "against the bf16 dense peak" in log
    fp8, bf16 = train_losses(runs["fp8"]), train_losses(runs["bf16"])
    assert len(fp8) == len(bf16) == STEPS
    # The float8 matmuls engaged: the losses are not bf16's, yet training ends where bf16 does.
    assert fp8[1:] != bf16[1:]
    end_fp8, end_bf16 = sum(fp8[-10:]) / 10, sum(bf16[-10:]) / 10
    assert abs(end_fp8 - end_bf16) / end_bf16 < 0.03, (end_fp8, end_bf16)
    assert end_fp8 < fp8[0] - 1.0  # and it learned


def test_an_fp8_run_resumes_exactly(runs: dict) -> None:
    assert "resumed from" in runs["resumed_log"] and "step_0000050" in runs["resumed_log"]
    resumed = read_metrics(runs["resumed"])
    assert [r["step"] for r in resumed if "loss" in r] == list(range(51, STEPS + 1))
    assert train_losses(runs["resumed"]) == train_losses(runs["fp8"])[50:]  # bit-identical


def test_fp8_with_regional_compile_and_checkpointing_trains_the_same_losses(runs: dict) -> None:
    log = runs["wrapped_log"]
    assert "14 linear layers in float8" in log and "ZeRO-2 | fp8" in log and "ZeRO-3 | fp8" in runs["log"]
    assert BLOCKS[0] in compiled_graphs(log)  # the decoder blocks, float8 layers inside, compiled
    wrapped, eager = train_losses(runs["wrapped"]), train_losses(runs["fp8"])[:20]
    assert len(wrapped) == 20
    # Compiled casts round their scales a little differently from eager ones (and ZeRO-2's
    # reductions from ZeRO-3's).
    torch.testing.assert_close(torch.tensor(wrapped), torch.tensor(eager), rtol=1e-3, atol=0)


def test_the_fp8_export_is_plain_bf16_and_loads_without_torchao(runs: dict, data_cache: Path) -> None:
    from safetensors import safe_open

    export = runs["fp8"] / "export"
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        keys = set(f.keys())
    assert dtypes == {"BF16"} and "model.layers.0.mlp.down_proj.weight" in keys
    assert not any("float8" in k or "scale" in k for k in keys)
    # Evaluated where torchao cannot be imported: the held-out loss of the export (bf16 matmuls)
    # is the one the fp8 model reported at its last step, to float8's rounding.
    script = (
        "import json, sys; sys.modules['torchao'] = None\n"
        "from zeroforge.trainer.config import compose_config\n"
        "from zeroforge.trainer.evaluate import evaluate\n"
        "r = evaluate(compose_config(sys.argv[1:]))\n"
        "assert not [m for m in sys.modules if m.startswith('torchao') and sys.modules[m] is not None]\n"
        "print(json.dumps(r))\n"
    )
    args = [
        f"eval.model_path={export}",
        "experiment=smoke",
        f"data.cache_dir={data_cache}",
        *SMALL,
        "eval.batch_size=4",
        "eval.precision=bf16",
    ]
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])["val_loss"]
    trained = [r["val_loss"] for r in read_metrics(runs["fp8"]) if "val_loss" in r][-1]
    assert abs(evaluated - trained) / trained < 0.02, (evaluated, trained)


def test_convert_keeps_the_parameters_and_leaves_out_shapes_the_gemm_refuses() -> None:
    from torchao.float8.float8_linear import Float8Linear
    from transformers import LlamaConfig, LlamaForCausalLM

    from zeroforge.trainer.fp8 import convert_to_fp8, left_out

    # An MLP width of 120 is not a multiple of 16: the MLP stays bf16, attention converts.
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=120, num_hidden_layers=1, num_attention_heads=2, vocab_size=256))
    before = dict(model.named_parameters())
    converted = convert_to_fp8(model, "rowwise")
    assert converted == [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    assert all(isinstance(model.get_submodule(name), Float8Linear) for name in converted)
    assert left_out(model, converted) == [
        "model.layers.0.mlp.gate_proj (120x64, not multiples of 16)",
        "model.layers.0.mlp.up_proj (120x64, not multiples of 16)",
        "model.layers.0.mlp.down_proj (64x120, not multiples of 16)",
        "lm_head (the output layer)",
    ]
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    model(torch.randint(0, 256, (2, 16))).logits.sum().backward()
    assert model.get_submodule("model.layers.0.self_attn.q_proj").weight.grad is not None


def test_fp8_refusals_name_what_to_do() -> None:
    with pytest.raises(ConfigError, match=re.escape("train.fp8_recipe must be one of ['tensorwise', 'rowwise'], found 'mxfp8'")):
        validate(compose_config(["train.precision=fp8", "train.fp8_recipe=mxfp8"]), 1)
    # An A100 cluster (compute capability 8.0) has no FP8 tensor cores; an H100 one does.
    h100 = ["cluster=h100", "train.global_batch_size=128"]
    a100 = compose_config([*h100, "cluster.gpu_capability=8.0", "train.precision=fp8"])
    with pytest.raises(ConfigError, match=r"compute capability >= 8.9 .* found 8.0 .* train.precision=bf16"):
        job_topology(a100)
    assert job_topology(compose_config([*h100, "train.precision=fp8"])).precision == "fp8"


def test_fp8_without_torchao_is_refused_by_zeroforge_launch(data_cache: Path, tmp_path: Path) -> None:
    script = "import runpy, sys; sys.modules['torchao'] = None; sys.argv[0] = 'zeroforge'; runpy.run_module('zeroforge.launcher', run_name='__main__')"
    args = ["experiment=smoke", f"data.cache_dir={data_cache}", f"run.dir={tmp_path / 'run'}", "train.precision=fp8"]
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "pip install 'zeroforge[fp8]'" in result.stderr + result.stdout
    assert not (tmp_path / "run").exists()
