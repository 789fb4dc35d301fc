"""A committed DeepSpeed checkpoint read back as plain model weights, without an engine or ranks.

ZeRO 0-2 keep the whole module in mp_rank_00_model_states.pt, in the precision training computed
with. ZeRO-3 keeps each rank's slice of the fp32 master weights in that rank's optimizer file: the
slices are stitched back together (DeepSpeed's zero_to_fp32 layout) and cast to the module's
precision, so every stage gives the weights the export would have held at that step. Files are
memory-mapped, so the optimizer moments stored beside those weights are never read into memory.
"""
from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from zeroforge.trainer.checkpoint import LATEST, MANIFEST
from zeroforge.trainer.config import ConfigError

_ZERO3_MODEL = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")
_ZERO3_OPTIM = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def resolve_checkpoint(path: str | Path) -> Path:
    """A step_<N> directory as given, or the one a checkpoints directory's `latest` names."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    if (path / LATEST).exists():
        return path / (path / LATEST).read_text().strip()
    raise ConfigError(
        f"no checkpoint at {path}: expected a committed step_<N> directory (with {MANIFEST}) or a "
        f"checkpoints directory with a `{LATEST}` file, as training writes to <run.dir>/checkpoints."
    )


def read_manifest(step_dir: Path) -> dict[str, Any]:
    """The manifest, after checking that every file it lists is there with its size.

    Sizes, not checksums: hashing the optimizer states of a large model would take longer than
    the evaluation itself, and a committed directory was hashed when it was written.
    """
    manifest = json.loads((step_dir / MANIFEST).read_text())
    for name, entry in manifest["files"].items():
        found = (step_dir / name).stat().st_size if (step_dir / name).exists() else None
        if found != entry["bytes"]:
            raise ConfigError(
                f"checkpoint {step_dir} is incomplete: {name} should have {entry['bytes']} bytes, found "
                f"{'no file' if found is None else found}."
            )
    if "run" not in manifest:
        raise ConfigError(f"checkpoint {step_dir}: its manifest has no run section (an older format).")
    return manifest


@contextmanager
def _deepspeed_globals() -> Iterator[None]:
    """The few non-tensor types DeepSpeed and our client state pickle, so torch.load can stay
    weights_only (numpy arrays hold the saved RNG states)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    from torch.torch_version import TorchVersion

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct

    allowed = [
        np.dtype, np.ndarray, np.dtypes.UInt32DType, _reconstruct,
        TorchVersion, ZeroStageEnum, LossScaler, fragment_address,
    ]
    with torch.serialization.safe_globals(allowed):
        yield


def _load(path: Path) -> dict[str, Any]:
    with _deepspeed_globals():
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def _ranked(step_dir: Path, pattern: re.Pattern) -> list[Path]:
    found = sorted((int(m.group(1)), p) for p in step_dir.iterdir() if (m := pattern.search(p.name)))
    return [p for _, p in found]


def checkpoint_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """The full model weights on the CPU, named as the plain model names them."""
    zero3_models = _ranked(step_dir, _ZERO3_MODEL)
    if not zero3_models:
        path = step_dir / "mp_rank_00_model_states.pt"
        if not path.exists():
            raise ConfigError(f"checkpoint {step_dir} holds no DeepSpeed model states (mp_rank_00_model_states.pt).")
        return dict(_load(path)["module"])
    return _zero3_state_dict(step_dir, zero3_models)


def _zero3_state_dict(step_dir: Path, model_files: list[Path]) -> dict[str, torch.Tensor]:
    optim_files = _ranked(step_dir, _ZERO3_OPTIM)
    world = len(model_files)
    if len(optim_files) != world:
        raise ConfigError(
            f"checkpoint {step_dir}: expected {world} ZeRO-3 optimizer files (one a rank), found {len(optim_files)}."
        )
    meta = _load(model_files[0])
    flats = [_load(f)["optimizer_state_dict"]["fp32_flat_groups"] for f in optim_files]
    # The partitioned module holds empty placeholders in the precision the model ran in.
    dtype = next(iter(meta["module"].values())).dtype
    state = {k: v.to(dtype) for k, v in meta["module"].items() if k in meta["buffer_names"]}
    for group, shapes in enumerate(meta["param_shapes"]):
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)  # each rank's slice, the last one zero-padded
            slices = [flats[rank][group][offset : offset + part] for rank in range(world)]
            state[name] = torch.cat(slices)[:numel].view(shape).to(dtype)
            offset += part
        if offset != flats[0][group].numel():
            raise ConfigError(
                f"checkpoint {step_dir}: parameter group {group} has {flats[0][group].numel()} values a rank "
                f"but its parameters account for {offset}; the checkpoint's layout is not one this reader knows."
            )
    for name, source in meta["shared_params"].items():  # tied weights are stored once
        state[name] = state[source]
    return state


def run_config(step_dir: Path) -> tuple[DictConfig, Path]:
    """The resolved config.yaml of the run that wrote the checkpoint, and that run's directory."""
    for run_dir in (step_dir.parent.parent, step_dir.parent):
        if (run_dir / "config.yaml").exists():
            return OmegaConf.load(run_dir / "config.yaml"), run_dir
    raise ConfigError(
        f"no config.yaml found for checkpoint {step_dir}: expected the run's resolved config in "
        f"{step_dir.parent.parent} (a checkpoint is read from its run directory, <run.dir>/checkpoints/step_<N>)."
    )


def run_tokenizer(step_dir: Path, manifest: dict[str, Any]) -> tuple[Optional[Path], str]:
    """The prepared data the checkpoint's run trained on (None when it streamed its data), and
    where its tokenizer is: the prepared copy, or the streamed run's data.tokenizer."""
    cfg, _ = run_config(step_dir)
    if cfg.data.get("mode") == "stream":
        return None, str(cfg.data.tokenizer)
    prepared = prepared_data(step_dir, manifest)
    return prepared, str(prepared / "tokenizer")


def prepared_data(step_dir: Path, manifest: dict[str, Any]) -> Path:
    """The prepared data (and tokenizer) the checkpoint's run trained on."""
    from zeroforge.data.prepare import prepared_dir_for

    cfg, run_dir = run_config(step_dir)
    path = prepared_dir_for(cfg.data.cache_dir, cfg.data.name, manifest["run"]["data"]["fingerprint"])
    if not (path / "tokenizer").exists():
        raise ConfigError(
            f"checkpoint {step_dir} was trained on the data prepared in {path}, which is gone; prepare it "
            f"again with the run's data settings (zeroforge prepare, overrides from {run_dir / 'config.yaml'})."
        )
    return path
