"""Loading a model for evaluation and generation: an HF export (ours or any causal LM directory),
or a DeepSpeed checkpoint of a run, consolidated on the fly (trainer/consolidate.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from zeroforge.data.tokenizer import load_tokenizer, tokenizer_hash
from zeroforge.trainer import consolidate
from zeroforge.trainer.checkpoint import LATEST, MANIFEST
from zeroforge.trainer.config import ConfigError
from zeroforge.trainer.model import hf_config, resolve_vocab_size
from zeroforge.trainer.topology import accelerator_is_cuda, resolve_precision


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    # The prepared data the weights were trained on, where known: evaluation reads its validation split.
    prepared_data: Optional[Path]
    # "export" or "checkpoint", and its directory (a checkpoint's step_<N>, `latest` resolved).
    kind: str
    path: Path
    step: Optional[int] = None

    @property
    def source(self) -> str:
        return f"{self.kind} {self.path}"


def pick_device() -> str:
    return "cuda" if accelerator_is_cuda() else "cpu"


def inference_dtype(precision: Any, device: str) -> torch.dtype:
    """auto: bf16 on a GPU, fp32 on the CPU (as training picks its precision)."""
    return torch.bfloat16 if resolve_precision(precision, device.startswith("cuda")) == "bf16" else torch.float32


def load_model(path: str | Path, device: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """An export directory (config.json), a checkpoint step_<N> directory, or a checkpoints
    directory (its `latest`): whichever `path` is."""
    path = Path(path)
    if (path / "config.json").exists():
        return load_export(path, device, dtype)
    if (path / MANIFEST).exists() or (path / LATEST).exists():
        return load_from_checkpoint(path, device, dtype)
    raise ConfigError(
        f"no model at {path}: expected an export directory with config.json, weights and a tokenizer "
        "(<run.dir>/export), a checkpoint directory <run.dir>/checkpoints/step_<N>, or "
        "<run.dir>/checkpoints (its latest); set eval.model_path or generate.model_path."
    )


def load_export(path: str | Path, device: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    path = Path(path)
    if not (path / "config.json").exists():
        raise ConfigError(f"no model at {path}: expected an export directory with config.json, weights and a tokenizer.")
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)  # type: ignore[arg-type]  # transformers wraps .to()
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(
            f"the tokenizer in {path} has {len(tokenizer)} tokens but the model's vocabulary has "
            f"{model.config.vocab_size}; they do not belong together."
        )
    meta = json.loads((path / "zeroforge.json").read_text()) if (path / "zeroforge.json").exists() else {}
    recorded = Path(meta["prepared_data"]) if meta.get("prepared_data") else None
    prepared = recorded if recorded is not None and (recorded / "manifest.json").exists() else None
    return LoadedModel(model.eval(), tokenizer, prepared, "export", path, meta.get("step"))


@dataclass
class CheckpointSource:
    """A committed checkpoint with what its weights need to become a model: the config its manifest
    recorded, the tokenizer of the data its run trained on, and the weights, read lazily."""

    path: Path
    step: int
    tokens: int
    config: PretrainedConfig
    attn_implementation: str
    tokenizer: PreTrainedTokenizerBase
    prepared_data: Optional[Path]
    weights: consolidate.CheckpointWeights


def open_checkpoint(path: str | Path) -> CheckpointSource:
    step_dir = consolidate.resolve_checkpoint(path)
    manifest = consolidate.read_manifest(step_dir)
    prepared, tokenizer_at = consolidate.run_tokenizer(step_dir, manifest)
    tokenizer = load_tokenizer(tokenizer_at)
    if tokenizer_hash(tokenizer) != manifest["run"]["tokenizer_hash"]:
        raise ConfigError(
            f"the tokenizer in {tokenizer_at} (hash {tokenizer_hash(tokenizer)}) is not the one "
            f"checkpoint {step_dir} was trained with (hash {manifest['run']['tokenizer_hash']})."
        )
    model_cfg = OmegaConf.create(manifest["run"]["model"])
    config = hf_config(model_cfg, resolve_vocab_size(model_cfg, len(tokenizer)), tokenizer.eos_token_id)
    return CheckpointSource(
        step_dir,
        manifest["step"],
        manifest["run"]["tokens"],
        config,
        model_cfg.attn_implementation,
        tokenizer,
        prepared,
        consolidate.checkpoint_weights(step_dir),
    )


def load_from_checkpoint(path: str | Path, device: str, dtype: Optional[torch.dtype] = None) -> LoadedModel:
    """The model of a committed checkpoint, built from the shape its manifest recorded, with the
    tokenizer of the data its run trained on. dtype None: the precision the run trained in."""
    source = open_checkpoint(path)
    weights = source.weights
    model = filled_model(source.config, weights, dtype or weights.specs[0].dtype, source.attn_implementation, device)
    return LoadedModel(model.eval(), source.tokenizer, source.prepared_data, "checkpoint", source.path, source.step)


def filled_model(
    config: PretrainedConfig, weights: consolidate.CheckpointWeights, dtype: torch.dtype, attn_implementation: str, device: str
) -> PreTrainedModel:
    """The model of `config` on `device`, its weights filled one tensor at a time from a checkpoint:
    besides the model, the host holds one tensor in flight, never a copy of the weights."""
    from transformers.initialization import no_init_weights

    with no_init_weights(), torch.device(device):  # every weight is overwritten below: none is drawn
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.tie_weights()  # no_init_weights also skips post_init's tying
    every_param = dict(model.named_parameters(remove_duplicate=False))
    targets = {  # a tied weight under its first name, and the persistent buffers
        **dict(model.named_parameters()),
        **{name: t for name, t in model.state_dict(keep_vars=True).items() if name not in every_param},
    }
    found = {spec.name for spec in weights.specs}
    problems = {"missing": sorted(set(targets) - found), "unexpected": sorted(found - set(targets))}
    problems["mismatched"] = sorted(
        f"{s.name}: {list(s.shape)} vs {list(targets[s.name].shape)}"
        for s in weights.specs
        if s.name in targets and tuple(targets[s.name].shape) != s.shape
    )
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        raise ConfigError(f"checkpoint {weights.path} does not fit the model its manifest describes: {problems}.")
    with torch.no_grad():
        for name, tensor in weights.tensors(dtype):
            targets[name].copy_(tensor)
    return model
