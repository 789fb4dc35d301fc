from __future__ import annotations

import pytest

from trainer.metrics import mfu, peak_for_device, peak_tflops


def test_mfu_from_known_flops_and_time() -> None:
    # 1e9 FLOPs per token at 1e5 tokens/s on 2 accelerators of 100 TFLOP/s peak: 1e14 / 2e14.
    assert mfu(1e9, 1e5, world_size=2, peak=100.0) == pytest.approx(0.5)
    assert mfu(1e9, 1e5, world_size=2, peak=None) is None
    assert peak_tflops(989.0, "cpu") == 989.0 and peak_tflops(None, "cpu") is None


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA GH200 480GB", 989.0), ("NVIDIA B200", 2250.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("Tesla T4", None),
])
def test_peak_by_device_name(name: str, peak: float) -> None:
    assert peak_for_device(name) == peak


def test_mfu_of_a_known_model_and_step_time() -> None:
    # llama-8b at seq_len 8192: 6N + 12 L d T FLOPs per token; 4M tokens in 10 s on 64 H100s.
    from launcher.config import compose_config
    from launcher.plan import model_shape

    shape = model_shape(compose_config(["model=llama-8b", "model.vocab_size=128256", "data.seq_len=8192"]))
    matmul_params = shape.params - shape.vocab_size * shape.hidden  # the input embedding is a lookup
    assert shape.flops_per_token == 6 * matmul_params + 12 * 32 * 4096 * 8192
    tokens_per_s = 4 * 2**20 / 10.0
    expected = shape.flops_per_token * tokens_per_s / (64 * 989e12)
    assert mfu(shape.flops_per_token, tokens_per_s, 64, peak_for_device("NVIDIA H100 80GB HBM3")) == pytest.approx(expected)
    assert 0.3 < expected < 0.5
