"""A checkpoint that pickles anything but tensors and DeepSpeed's own types is refused on resume,
and the code it names never runs: not in the check, not in DeepSpeed's loaders, not in the
conversion to the universal form."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from zeroforge.trainer.background_save import file_entry
from zeroforge.trainer.checkpoint import MANIFEST, Checkpointer, find_resume_checkpoint, step_tag
from zeroforge.trainer.config import ConfigError, compose_config
from zeroforge.trainer.distributed import DistInfo
from zeroforge.trainer.universal import CheckpointSizes, checkpoint_sizes, convert, plan_conversion

ONE_PROCESS = DistInfo(0, 1, 0)


class _WritesMarker:
    """Unpickled in full, it runs code: here, writing the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def _committed(root: Path, files: dict[str, object]) -> Path:
    """A committed step directory (its manifest verifies) holding these torch.save files."""
    step_dir = root / step_tag(10)
    step_dir.mkdir(parents=True)
    for name, obj in files.items():
        torch.save(obj, step_dir / name)
    manifest = {"step": 10, "files": {name: file_entry(step_dir / name) for name in files}}
    (step_dir / MANIFEST).write_text(json.dumps(manifest))
    return step_dir


def test_a_checkpoint_with_a_foreign_object_is_refused_before_loading(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    root = tmp_path / "checkpoints"
    _committed(root, {"mp_rank_00_model_states.pt": {"module": {"w": torch.ones(2)}, "extra": _WritesMarker(marker)}})
    with pytest.raises(ConfigError) as refused:
        find_resume_checkpoint(root, "auto", ONE_PROCESS)
    message = str(refused.value)
    assert "refusing to resume from" in message and "mp_rank_00_model_states.pt pickles builtins.exec" in message
    assert not marker.exists()


def test_deepspeeds_own_loads_are_made_weights_only(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    step_dir = _committed(tmp_path, {"mp_rank_00_model_states.pt": {"extra": _WritesMarker(marker)}})
    # DeepSpeed's checkpoint engine, as engine.load_checkpoint calls it (weights_only=False).
    deepspeed_load = TorchCheckpointEngine().load
    deepspeed_load(str(step_dir / "mp_rank_00_model_states.pt"))
    assert marker.read_text() == "ran"  # the file is dangerous as DeepSpeed loads it on its own
    marker.unlink()

    engine = SimpleNamespace(
        optimizer=SimpleNamespace(param_groups=[], state={}),
        load_checkpoint=lambda load_dir, tag: (None, deepspeed_load(f"{load_dir}/{tag}/mp_rank_00_model_states.pt")),
    )
    checkpointer = Checkpointer(engine, compose_config([f"run.dir={tmp_path}"]).checkpoint, ONE_PROCESS, {})
    with pytest.raises(ConfigError, match="refusing to resume from .*: a file pickles exec. A zeroforge checkpoint holds only tensors"):
        checkpointer.load(step_dir)
    assert not marker.exists()


def test_the_conversion_to_the_universal_form_loads_weights_only(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    marker = tmp_path / "marker"
    # Enough of a ZeRO checkpoint for DeepSpeed's converter to load its files.
    evil = {"extra": _WritesMarker(marker)}
    step_dir = _committed(tmp_path, {"mp_rank_00_model_states.pt": evil, "zero_pp_rank_0_mp_rank_00_optim_states.pt": evil})
    deepspeed_convert = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(step_dir)]
    subprocess.run([*deepspeed_convert, "--output_folder", str(tmp_path / "out"), "--inject_missing_state"], capture_output=True)
    assert marker.read_text() == "ran"  # DeepSpeed's converter on its own runs the code
    marker.unlink()

    # The launcher's plan reads the parameter shapes from a model-states file's pickle alone.
    with pytest.raises(ConfigError, match="cannot read the parameter shapes in .*mp_rank_00_model_states.pt"):
        checkpoint_sizes(step_dir)
    assert not marker.exists()
    capfd.readouterr()
    with pytest.raises(ConfigError, match="converting it to DeepSpeed's universal checkpoint failed"):
        convert(step_dir, plan_conversion(CheckpointSizes(1, 1.0, 1.0, 1.0, 1), None, 0.5), None)
    assert "Unsupported global: GLOBAL exec" in capfd.readouterr().err
    assert not marker.exists() and not (step_dir / "universal").exists() and not (step_dir / "universal.tmp").exists()
