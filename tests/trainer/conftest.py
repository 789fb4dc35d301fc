"""Models the evaluation and generation tests share: tiny random ones, and one trained smoke run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, exact_overrides, once_per_session, run_module


def save_tiny_model(data_cache: Path, out: Path, seed: int, overrides: list[str] = ()) -> Path:
    """A randomly initialised model of conf/model/tiny.yaml (with overrides), saved as an export
    with the tokenizer of the prepared embedded corpus."""
    from zeroforge.data.prepare import prepare
    from zeroforge.data.tokenizer import load_tokenizer
    from zeroforge.trainer.config import compose_config
    from zeroforge.trainer.model import build_model, resolve_vocab_size

    cfg = compose_config([f"data.cache_dir={data_cache}", *overrides])
    tokenizer = load_tokenizer(prepare(cfg.data) / "tokenizer")
    torch.manual_seed(seed)
    model = build_model(cfg.model, resolve_vocab_size(cfg.model, len(tokenizer)), tokenizer.eos_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def swap_two_tokens(export: Path, out: Path) -> Path:
    """The same export with a tokenizer of the same size that maps two tokens the other way round."""
    shutil.copytree(export, out)
    spec = json.loads((out / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = "def", "class"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (out / "tokenizer.json").write_text(json.dumps(spec))
    return out


@pytest.fixture(scope="session")
def tiny_export(data_cache: Path, tmp_path_factory) -> Path:
    return save_tiny_model(data_cache, tmp_path_factory.mktemp("tiny") / "export", seed=0)


@pytest.fixture(scope="session")
def draft_export(data_cache: Path, tmp_path_factory) -> Path:
    """Smaller than tiny (one layer, half the width), same tokenizer."""
    small = ["model.num_layers=1", "model.hidden_size=64", "model.num_heads=2", "model.num_kv_heads=2", "model.intermediate_size=128"]
    return save_tiny_model(data_cache, tmp_path_factory.mktemp("draft") / "export", seed=1, overrides=small)


@pytest.fixture(scope="session")
def plain_loss_run(data_cache: Path, tmp_path_factory) -> Path:
    """The single-process reference run with every throughput feature off, as the trainer ran
    before them: the plain `logits.float()` loss, torch's unfused AdamW, no compile."""

    def build(base: Path) -> None:
        overrides = [*exact_overrides(data_cache, base / "run", 0), "train.loss=plain", "optim.fused=false", "model.compile=off"]
        result = run_module("zeroforge.trainer.train", overrides, cwd=REPO)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    return once_per_session(tmp_path_factory, "plain", build) / "run"
