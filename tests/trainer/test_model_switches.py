"""Activation checkpointing, torch.compile, the fused AdamW and the chunked loss change how the
model is run, not what it computes: the same losses and the plain model's checkpoint names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, exact_overrides, run_module, train_losses

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "switch,rtol",
    [
        ("model.activation_checkpointing=true", 0.0),
        ("model.compile=full", 1e-4),
        # Regional compile (each decoder block in place) with torch's fused AdamW kernel (CPU too).
        ("model.compile=regional optim.fused=true", 1e-4),
    ],
)
def test_switch_keeps_losses_and_checkpoint_names(
    switch: str, rtol: float, single_process_run: Path, data_cache: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    result = run_module("zeroforge.trainer.train", [*exact_overrides(data_cache, run_dir, 0), *switch.split()], cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(train_losses(run_dir)), torch.tensor(train_losses(single_process_run)), rtol=rtol, atol=1e-6)
    # Saved under the plain model's names: no `_orig_mod.` or wrapper prefixes.
    ref = load_file(single_process_run / "export" / "model.safetensors")
    assert sorted(load_file(run_dir / "export" / "model.safetensors")) == sorted(ref)


def test_the_defaults_train_the_tiny_model_like_before(single_process_run: Path, plain_loss_run: Path) -> None:
    """All defaults (on the CPU: the chunked loss) against every feature off (the plain loss, as
    the trainer computed it before): 20 logged steps, within fp32 rounding."""
    from zeroforge.trainer.config import compose_config
    from zeroforge.trainer.loss import resolve_loss

    defaults = compose_config()
    assert resolve_loss(defaults.train.loss, defaults.model.model_type) == "chunked"
    found, expected = train_losses(single_process_run), train_losses(plain_loss_run)
    assert len(found) == len(expected) == 20 and expected[0] > expected[-1] + 1.0  # it learned
    torch.testing.assert_close(torch.tensor(found), torch.tensor(expected), rtol=1e-5, atol=0)
    ref = load_file(plain_loss_run / "export" / "model.safetensors")
    got = load_file(single_process_run / "export" / "model.safetensors")
    assert sorted(got) == sorted(ref)
