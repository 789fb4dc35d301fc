from __future__ import annotations

import math

import pytest

from zeroforge.trainer.config import compose_config
from zeroforge.trainer.schedule import lr_factor


def test_cosine_warms_up_linearly_then_decays_to_the_floor() -> None:
    cfg = compose_config(["optim=adamw_cosine", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1"]).optim
    f = lr_factor(cfg, total_steps=100)
    assert [f(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_wsd_is_stable_then_decays_linearly() -> None:
    cfg = compose_config(["optim=adamw_wsd", "optim.warmup_steps=5", "optim.decay_fraction=0.2"]).optim
    f = lr_factor(cfg, total_steps=100)
    assert f(5) == f(50) == f(80) == 1.0
    assert f(90) == pytest.approx(0.5)
    assert f(100) == pytest.approx(cfg.min_lr_ratio)
