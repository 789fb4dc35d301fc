"""Checkpoint files are unpickled as weights only, whoever calls torch.load.

A DeepSpeed checkpoint is a set of pickles, and unpickling one in full runs whatever code an
object in it names. zeroforge's own loads pass weights_only=True; DeepSpeed's (its checkpoint
engine, the universal-checkpoint loaders and ds_to_universal) pass weights_only=False and take no
argument to change it. Inside weights_only_loads() torch's own switch,
TORCH_FORCE_WEIGHTS_ONLY_LOAD, overrides every call, and the few non-tensor types DeepSpeed and
our client state pickle are allowed by name. Before a resume, foreign_types() reads each file's
pickle (not its tensors), so a refused checkpoint is named with its file and the types it carries.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def checkpoint_types() -> list[Any]:
    """Every non-tensor type a zeroforge checkpoint of any ZeRO stage pickles (found by loading each
    file of ZeRO 0-3 checkpoints, fp32 and bf16, 1 and 2 ranks, and their universal form)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    from torch.torch_version import TorchVersion

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

    return [
        # numpy arrays hold the saved RNG states.
        np.dtype,
        np.ndarray,
        np.dtypes.UInt32DType,
        _reconstruct,
        # Checkpoints of earlier zeroforge versions recorded torch.__version__.
        TorchVersion,
        ZeroStageEnum,
        LossScaler,
        fragment_address,
    ]


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load in this process (and in processes it forks) is weights_only, even where the
    caller passes weights_only=False, with checkpoint_types() allowed."""
    previous = os.environ.get(_FORCE)
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(checkpoint_types()):
            yield
    finally:
        if previous is None:
            del os.environ[_FORCE]
        else:
            os.environ[_FORCE] = previous


def foreign_types(path: Path) -> list[str]:
    """The types the torch.save file at `path` pickles beyond tensors and checkpoint_types(), read
    from its pickle alone (no tensor is loaded). Raises ValueError or RuntimeError for a file that
    is not a torch.save zip archive."""
    with torch.serialization.safe_globals(checkpoint_types()):
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
