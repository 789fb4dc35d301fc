"""Activation checkpointing and torch.compile wrap the model without changing what it computes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, exact_overrides, run_module, train_losses

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("switch,rtol", [("model.activation_checkpointing=true", 0.0), ("model.compile=true", 1e-4)])
def test_switch_keeps_losses_and_checkpoint_names(
    switch: str, rtol: float, single_process_run: Path, data_cache: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    result = run_module("zeroforge.trainer.train", [*exact_overrides(data_cache, run_dir, 0), switch], cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    torch.testing.assert_close(
        torch.tensor(train_losses(run_dir)), torch.tensor(train_losses(single_process_run)), rtol=rtol, atol=1e-6
    )
    # Saved under the plain model's names: no `_orig_mod.` or wrapper prefixes.
    ref = load_file(single_process_run / "export" / "model.safetensors")
    assert sorted(load_file(run_dir / "export" / "model.safetensors")) == sorted(ref)
