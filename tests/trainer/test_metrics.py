from __future__ import annotations

import pytest

from trainer.metrics import mfu, peak_tflops


def test_mfu_from_known_flops_and_time() -> None:
    # 1e9 FLOPs per token at 1e5 tokens/s on 2 accelerators of 100 TFLOP/s peak: 1e14 / 2e14.
    assert mfu(1e9, 1e5, world_size=2, peak=100.0) == pytest.approx(0.5)
    assert mfu(1e9, 1e5, world_size=2, peak=None) is None
    assert peak_tflops(989.0, "cpu") == 989.0 and peak_tflops(None, "cpu") is None
