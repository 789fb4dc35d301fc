"""A committed DeepSpeed checkpoint read back as plain model weights, without an engine or ranks.

ZeRO 0-2 keep the whole module in mp_rank_00_model_states.pt, in the precision training computed
with. ZeRO-3 keeps each rank's slice of the fp32 master weights in that rank's optimizer file: the
slices are stitched back together (DeepSpeed's zero_to_fp32 layout) and cast to the module's
precision, so every stage gives the weights the export would have held at that step. Files are
memory-mapped and read one tensor at a time (the optimizer moments stored beside the weights are
never read), and pages once read leave the process: reading a checkpoint holds about one
parameter, not the model.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import mmap
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, cast

import torch
from omegaconf import DictConfig, OmegaConf

from zeroforge.trainer.checkpoint import LATEST, MANIFEST
from zeroforge.trainer.config import ConfigError
from zeroforge.trainer.safe_load import checkpoint_types
from zeroforge.trainer.safetensors_io import TensorSpec

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


def _load(path: Path) -> dict[str, Any]:
    with torch.serialization.safe_globals(checkpoint_types()):
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def _ranked(step_dir: Path, pattern: re.Pattern) -> list[Path]:
    found = sorted((int(m.group(1)), p) for p in step_dir.iterdir() if (m := pattern.search(p.name)))
    return [p for _, p in found]


def _drop_from_memory(tensor: torch.Tensor) -> None:
    """Memory-mapped checkpoint pages, once read, leave this process's resident memory (the kernel
    keeps them in its page cache): reading a whole checkpoint never leaves it all resident."""
    if not sys.platform.startswith("linux") or tensor.numel() == 0:
        return
    start = tensor.data_ptr() - tensor.data_ptr() % mmap.PAGESIZE
    end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
    # Pages at either end may hold neighbouring values: a private file mapping that was only read
    # gives them back from the file when they are touched again.
    _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


_MADV_DONTNEED = 4


@dataclass
class CheckpointWeights:
    """A checkpoint's model weights, named as the plain model names them (a tied weight once),
    read one tensor at a time: the memory-mapped files are never read whole."""

    path: Path
    # Each tensor's name, shape, and the dtype training computed in.
    specs: list[TensorSpec]
    _read: Callable[[str, torch.dtype], torch.Tensor]

    def tensors(self, dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in the order of specs, each built when asked for; floating tensors cast
        to dtype (None: the training precision)."""
        for spec in self.specs:
            wanted = dtype if dtype is not None and spec.dtype.is_floating_point else spec.dtype
            yield spec.name, self._read(spec.name, wanted)


def checkpoint_weights(step_dir: Path) -> CheckpointWeights:
    """The model weights of a committed checkpoint of any ZeRO stage."""
    zero3_models = _ranked(step_dir, _ZERO3_MODEL)
    if zero3_models:
        return _zero3_weights(step_dir, zero3_models)
    path = step_dir / "mp_rank_00_model_states.pt"
    if not path.exists():
        raise ConfigError(f"checkpoint {step_dir} holds no DeepSpeed model states (mp_rank_00_model_states.pt).")
    states = _load(path)
    _refuse_expert_layers(step_dir, states)
    module = states["module"]
    # A tied weight is saved once and named twice: keep its first name.
    seen, unique = set(), {}
    for name, tensor in module.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            unique[name] = tensor

    def read(name: str, dtype: torch.dtype) -> torch.Tensor:
        out = unique[name].to(dtype, copy=True)
        _drop_from_memory(unique[name])
        return out

    return CheckpointWeights(step_dir, [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in unique.items()], read)


def _refuse_expert_layers(step_dir: Path, states: dict[str, Any]) -> None:
    """A mixture of experts trained through DeepSpeed's AutoEP saves its experts in AutoEP's layout,
    split over the ranks and its optimizer groups (listed in `ds_autoep_layers`), which this reader
    does not assemble."""
    if states.get("ds_autoep_layers"):
        step = read_manifest(step_dir)["step"]
        raise ConfigError(
            f"checkpoint {step_dir} holds the expert layers of DeepSpeed's AutoEP (a mixture of experts), which zeroforge "
            "reads only through training: evaluate, generate and export read the HF export that training writes at its "
            f"end; for this checkpoint's, resume it with train.steps={step} (it writes the export without training)."
        )


def _zero3_weights(step_dir: Path, model_files: list[Path]) -> CheckpointWeights:
    optim_files = _ranked(step_dir, _ZERO3_OPTIM)
    world = len(model_files)
    if len(optim_files) != world:
        raise ConfigError(f"checkpoint {step_dir}: expected {world} ZeRO-3 optimizer files (one a rank), found {len(optim_files)}.")
    meta = _load(model_files[0])
    _refuse_expert_layers(step_dir, meta)
    flats = [_load(f)["optimizer_state_dict"]["fp32_flat_groups"] for f in optim_files]
    # Where each parameter's slices lie: in its sub-group's flat fp32 partition, at the same offset
    # on every rank, ceil(numel / world) values a rank (the last one zero-padded).
    located: dict[str, tuple[int, int, tuple[int, ...]]] = {}
    for group, shapes in enumerate(meta["param_shapes"]):
        offset = 0
        for name, shape in shapes.items():
            located[name] = (group, offset, tuple(shape))
            offset += math.ceil(math.prod(shape) / world)
        if offset != flats[0][group].numel():
            raise ConfigError(
                f"checkpoint {step_dir}: parameter group {group} has {flats[0][group].numel()} values a rank "
                f"but its parameters account for {offset}; the checkpoint's layout is not one this reader knows."
            )
    # The partitioned module holds empty placeholders in the precision the model ran in.
    trained = next(iter(meta["module"].values())).dtype
    buffers = {k: v for k, v in meta["module"].items() if k in meta["buffer_names"]}
    specs = [  # in the module's own order; tied weights are stored once, under their source's name
        TensorSpec(name, located[name][2] if name in located else tuple(buffers[name].shape), trained)
        for name in meta["module"]
        if name not in meta["shared_params"] and (name in located or name in buffers)
    ]

    def read(name: str, dtype: torch.dtype) -> torch.Tensor:
        if name in buffers:
            return buffers[name].to(dtype, copy=True)
        group, offset, shape = located[name]
        numel = math.prod(shape)
        part = math.ceil(numel / world)
        out = torch.empty(numel, dtype=dtype)
        for rank in range(world):
            count = min(part, numel - rank * part)
            if count > 0:
                piece = flats[rank][group].narrow(0, offset, count)
                out.narrow(0, rank * part, count).copy_(piece)
                _drop_from_memory(piece)
        return out.view(shape)

    return CheckpointWeights(step_dir, specs, read)


def run_config(step_dir: Path) -> tuple[DictConfig, Path]:
    """The resolved config.yaml of the run that wrote the checkpoint, and that run's directory."""
    for run_dir in (step_dir.parent.parent, step_dir.parent):
        if (run_dir / "config.yaml").exists():
            return cast(DictConfig, OmegaConf.load(run_dir / "config.yaml")), run_dir
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
