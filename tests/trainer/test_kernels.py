"""Which kernels a run asks for is decided, and refused when it cannot be had, before any process
starts: the loss, Liger, flash-attn, and torch's fused AdamW (on CUDA only by default)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.conftest import REPO, run_module
from zeroforge.trainer.config import ConfigError, compose_config
from zeroforge.trainer.engine import fused_adamw
from zeroforge.trainer.validate import validate

LIGER = importlib.util.find_spec("liger_kernel") is not None
FLASH = importlib.util.find_spec("flash_attn") is not None


@pytest.mark.parametrize(
    "fused,cuda,expected", [("null", True, True), ("null", False, False), ("false", True, False), ("true", False, True)]
)
def test_fused_adamw_by_default_on_cuda_only(fused: str, cuda: bool, expected: bool) -> None:
    cfg = compose_config([f"optim.fused={fused}"])
    assert fused_adamw(cfg.optim, validate(cfg, 1, cuda=cuda)) is expected


@pytest.mark.parametrize("override", ["train.loss=liger", "model.liger_kernels=true"])
def test_liger_without_liger_kernel_or_a_gpu_is_refused(override: str) -> None:
    expected = "Liger's kernels are Triton, for CUDA GPUs only" if LIGER else "pip install liger-kernel"
    with pytest.raises(ConfigError, match=expected) as refused:
        validate(compose_config([override]), 1, cuda=False)
    assert override in str(refused.value)


def test_flash_attention_2_without_flash_attn_is_refused() -> None:
    expected = "runs on CUDA GPUs only" if FLASH else "needs the flash-attn package, which is not installed: pip install flash-attn"
    with pytest.raises(ConfigError, match=expected):
        validate(compose_config(["model.attn_implementation=flash_attention_2"]), 1, cuda=False)


def test_the_chunked_loss_is_refused_where_logits_are_not_a_plain_output_layer() -> None:
    cfg = compose_config(["model.model_type=granite", "train.loss=chunked"])
    with pytest.raises(ConfigError, match="train.loss=chunked .* model.model_type='granite' is not known to do exactly"):
        validate(cfg, 1, cuda=False)
    validate(compose_config(["model.model_type=granite"]), 1, cuda=False)  # auto: the plain loss there


@pytest.mark.skipif(FLASH, reason="flash-attn is installed here, so there is nothing to refuse")
def test_launch_refuses_flash_attention_2_before_anything_starts(data_cache: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    result = run_module(
        "zeroforge.launcher",
        [
            f"data.cache_dir={cache}",
            f"run.dir={tmp_path / 'run'}",
            "logging.wandb.mode=disabled",
            "model.attn_implementation=flash_attention_2",
        ],
        cwd=REPO,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    assert "zeroforge: configuration error: model.attn_implementation=flash_attention_2 needs the flash-attn package" in output
    assert "Traceback" not in output and not cache.exists()
