"""Checkpoints that commit atomically, and the plain HF export.

A save goes through DeepSpeed into step_<N>.tmp; after every rank has written, the files are
hashed (each rank a share), rank 0 writes manifest.json, renames the directory to step_<N> and
only then moves the `latest` pointer (write, fsync, rename, fsync the directory). A checkpoint
whose manifest does not verify is never loaded: loading falls back to the newest one that does.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from zeroforge.trainer.background_save import BackgroundWriter, file_entry
from zeroforge.trainer.config import ConfigError
from zeroforge.trainer.distributed import DistInfo, barrier, from_rank_zero, gather
from zeroforge.trainer.partitioned import full_shape
from zeroforge.trainer.safetensors_io import ShardedWriter, TensorSpec

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

log = logging.getLogger("zeroforge")

LATEST = "latest"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_tag(step: int) -> str:
    return f"step_{step:07d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _agree_or_raise(problem: Optional[str], dist: DistInfo, what: str) -> None:
    """Every rank raises if any rank failed, instead of the others waiting in a collective."""
    problems = [p for p in gather(problem, dist) if p]
    if problems:
        raise RuntimeError(f"{what} failed: " + "; ".join(problems))


def _fsync_tree(path: Path) -> None:
    for directory, _, _ in os.walk(path):
        _fsync(Path(directory))


def _my_share(files: list[str], dist: DistInfo) -> list[str]:
    """Each rank hashes every world_size-th file, so a large checkpoint is hashed in parallel."""
    return files[dist.rank :: dist.world_size]


@dataclass
class _InFlight:
    step: int
    tmp: Path
    final: Path
    run: dict[str, Any]


class Checkpointer:
    """Saves through DeepSpeed into step_<N>.tmp and commits atomically, then applies retention.

    With checkpoint.async_save the files are written by a background thread
    (trainer/background_save.py) and the commit waits for commit_pending(), which the training
    loop calls after the next step: the loop blocks only for the snapshot.
    """

    def __init__(self, engine: DeepSpeedEngine, cfg: DictConfig, dist: DistInfo):
        self.engine, self.cfg, self.dist = engine, cfg, dist
        self.root = Path(cfg.dir)
        self.writer: Optional[BackgroundWriter] = None
        if cfg.async_save:
            self.writer = BackgroundWriter(engine.checkpoint_engine.zipfile_serialization)
            engine.checkpoint_engine = self.writer
        self._in_flight: Optional[_InFlight] = None

    def save(self, step: int, client_state: dict[str, Any]) -> float:
        """Every rank must call it. Returns the seconds the caller was blocked."""
        started = time.perf_counter()
        self.commit_pending()  # one save in flight at a time
        final = self.root / step_tag(step)
        tmp = self.root / (step_tag(step) + ".tmp")
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
        barrier()
        self.engine.save_checkpoint(str(self.root), tag=tmp.name, client_state=client_state, save_latest=False)
        # What a resume must check before DeepSpeed touches the files (a model of another shape
        # fails inside DeepSpeed's loader, not with a clear message).
        run = {k: client_state[k] for k in ("tokens", "data", "tokenizer_hash", "world_size")}
        run["model"] = client_state["config"]["model"]
        self._in_flight = _InFlight(step, tmp, final, run)
        if self.writer is None:
            self.commit_pending()
        return time.perf_counter() - started

    def commit_pending(self) -> float:
        """Commit the save in flight, once its files are written; every rank must call it.
        Returns the seconds the caller was blocked (0 when nothing was in flight)."""
        if self._in_flight is None:
            return 0.0
        started = time.perf_counter()
        job, self._in_flight = self._in_flight, None
        dist = self.dist
        written, problem = self.writer.wait() if self.writer else ({}, None)
        _agree_or_raise(problem, dist, f"writing {job.final}")
        barrier()
        # Files a background writer already synced and hashed; every other file is hashed here,
        # each rank a share, so a large checkpoint is hashed in parallel.
        entries: dict[str, dict] = {}
        for part in gather({str(path.relative_to(job.tmp)): entry for path, entry in written.items()}, dist):
            entries.update(part)
        files = from_rank_zero(
            sorted(str(p.relative_to(job.tmp)) for p in job.tmp.rglob("*") if p.is_file()) if dist.is_main else None, dist
        )
        mine, problem = {}, None
        try:
            for name in _my_share([f for f in files if f not in entries], dist):
                mine[name] = file_entry(job.tmp / name)
        except OSError as err:
            problem = f"rank {dist.rank}: {err}"
        for part in gather(mine, dist):
            entries.update(part)
        _agree_or_raise(problem, dist, f"saving {job.final}")
        problem = None
        if dist.is_main:
            try:
                _commit(self.root, job.tmp, job.final, {"step": job.step, "run": job.run, "files": entries})
            except OSError as err:
                problem = f"rank 0: {err}"
        _agree_or_raise(problem, dist, f"committing {job.final}")
        if dist.is_main:
            apply_retention(self.root, self.cfg.keep_last, self.cfg.keep_every)
        return time.perf_counter() - started


def _commit(root: Path, tmp: Path, final: Path, manifest: dict) -> None:
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync(tmp / MANIFEST)
    _fsync_tree(tmp)
    # The same step saved again after a resume: the old copy goes only once the new one is in place.
    old = final.with_name(final.name + ".old")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    _fsync(root)
    shutil.rmtree(old, ignore_errors=True)
    pointer = root / (LATEST + ".tmp")
    pointer.write_text(final.name)
    _fsync(pointer)
    pointer.replace(root / LATEST)
    _fsync(root)
    log.info("committed checkpoint %s", final)


def _verify(path: Path, dist: DistInfo) -> Optional[str]:
    """None when every file of the manifest is there with its size and hash, else why not."""
    problem = None
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        for name in _my_share(sorted(files), dist):
            target = path / name
            if not target.exists() or target.stat().st_size != files[name]["bytes"]:
                problem = f"{name} is missing or has the wrong size"
                break
            if file_entry(target)["sha256"] != files[name]["sha256"]:
                problem = f"{name} does not match its checksum"
                break
    except (OSError, ValueError, KeyError) as err:
        problem = f"its manifest cannot be read ({err!r})"
    problems = [p for p in gather(problem, dist) if p]
    return problems[0] if problems else None


def apply_retention(root: Path, keep_last: int, keep_every: Optional[int]) -> list[Path]:
    """Delete committed checkpoints beyond the newest keep_last (but every keep_every-th step),
    and saves that died half-way. Called only after a commit, so the newest checkpoint is one
    that was just written and hashed; the one `latest` names is never deleted."""
    committed = committed_checkpoints(root)
    latest = (root / LATEST).read_text().strip() if (root / LATEST).exists() else None
    doomed = [
        path
        for i, path in enumerate(committed)
        if i >= keep_last and path.name != latest and not (keep_every and _step_of(path) % keep_every == 0)
    ]
    newest = _step_of(committed[0]) if committed else 0
    doomed += [p for p in root.glob("step_*.*") if p.suffix in (".tmp", ".old", ".deleting") and _step_of(p) < newest]
    for path in doomed:
        # Renamed first, so a deletion cut short never leaves a directory that looks committed.
        dying = path if path.suffix == ".deleting" else path.rename(path.with_name(path.name.split(".")[0] + ".deleting"))
        shutil.rmtree(dying, ignore_errors=True)
        log.info("retention: removed %s", path)
    return doomed


def _step_of(path: Path) -> int:
    return int(path.name.split(".")[0].split("_")[1])


def committed_checkpoints(root: str | Path) -> list[Path]:
    """Committed step directories, newest first (never a .tmp one)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def newest_checkpoint(root: str | Path, resume: str) -> Optional[Path]:
    """The checkpoint a resume would most likely continue from, found without hashing (for the
    launcher's check before any rank starts): the one checkpoint.resume names, or the newest
    committed one whose manifest reads. The trainer still verifies it (find_resume_checkpoint)."""
    if resume == "never":
        return None
    if resume != "auto":
        return Path(resume) if (Path(resume) / MANIFEST).exists() else None
    for candidate in committed_checkpoints(root):
        try:
            json.loads((candidate / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        return candidate
    return None


def find_resume_checkpoint(root: str | Path, resume: str, dist: DistInfo) -> Optional[Path]:
    """The checkpoint to resume from: `never`, `auto` (newest that verifies) or an explicit path."""
    if resume == "never":
        return None
    root = Path(root)
    if resume != "auto":
        path = Path(resume)
        problem = _verify(path, dist)
        if problem:
            raise ConfigError(f"checkpoint.resume={resume}: that checkpoint cannot be loaded ({problem}).")
        _abandon_newer_than(root, path, dist)
        return path
    candidates = from_rank_zero(committed_checkpoints(root) if dist.is_main else None, dist)
    problems = []
    for candidate in candidates:
        problem = _verify(candidate, dist)
        if problem is None:
            _abandon_newer_than(root, candidate, dist)
            return candidate
        log.warning("checkpoint %s does not verify (%s); trying an older one", candidate, problem)
        problems.append(f"{candidate.name}: {problem}")
    if problems:
        raise ConfigError(
            f"no checkpoint in {root} verifies ({'; '.join(problems)}); expected at least one to resume "
            "from. Set checkpoint.resume=never to start again from scratch in another run.dir."
        )
    return None


def _abandon_newer_than(root: Path, chosen: Path, dist: DistInfo) -> None:
    """Checkpoints newer than the one resumed belong to a timeline that is being replaced: move
    them to abandoned/, so a later auto-resume or retention never mistakes them for this run's."""
    if dist.is_main and chosen.parent == root:
        newer = [p for p in committed_checkpoints(root) if _step_of(p) > _step_of(chosen)]
        for path in newer:
            (root / "abandoned").mkdir(exist_ok=True)
            path.rename(root / "abandoned" / path.name)
            log.warning("moved %s to %s: the run resumes from the older %s", path.name, root / "abandoned", chosen.name)
        if newer:
            _fsync(root)
    barrier()


MODEL_KEYS = (
    "model_type",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "max_position_embeddings",
    "vocab_size",
    "tie_word_embeddings",
    "extra",
)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gathered_rng_states(dist: DistInfo) -> list[dict[str, Any]]:
    """Every rank's RNG states: rank 0's checkpoint file alone must restore all of them."""
    return gather(rng_state(), dist)


def check_resumable(path: Path, cfg: DictConfig, data_manifest: dict, world_size: int) -> bool:
    """Refuse to continue a run as a different one (steps, cadences and such may change).

    Returns whether the checkpoint was saved by another world size with partitioned (ZeRO)
    optimizer state, which only DeepSpeed's universal form of it can load.
    """
    run = json.loads((path / MANIFEST).read_text()).get("run")
    if run is None:
        raise ConfigError(f"cannot resume from {path}: its manifest has no run section (an older format).")
    saved = run["model"]
    now = OmegaConf.to_container(cfg.model, resolve=True)
    problems = [f"model.{k}: checkpoint {saved[k]!r}, now {now[k]!r}" for k in MODEL_KEYS if saved[k] != now[k]]
    data = run["data"]
    if data["fingerprint"] != data_manifest["fingerprint"]:
        problems.append(f"data fingerprint: checkpoint {data['fingerprint'][:12]}, now {data_manifest['fingerprint'][:12]}")
    if run["tokenizer_hash"] != data_manifest["tokenizer_hash"]:
        problems.append(f"tokenizer: checkpoint {run['tokenizer_hash']}, now {data_manifest['tokenizer_hash']}")
    if data["seq_len"] != cfg.data.seq_len:
        problems.append(f"data.seq_len: checkpoint {data['seq_len']}, now {cfg.data.seq_len}")
    if data["seed"] != cfg.seed:
        problems.append(f"seed (the data order): checkpoint {data['seed']}, now {cfg.seed}")
    if "partitions" in data:  # a streamed run's order: its partitions and shuffle
        for key, name in (("partitions", "stream_partitions"), ("shuffle_window", "stream_shuffle_window")):
            if data[key] != cfg.data[name]:
                problems.append(f"data.{name}: checkpoint {data[key]}, now {cfg.data[name]}")
    if problems:
        raise ConfigError(
            f"cannot resume from {path}: the run differs in "
            + "; ".join(problems)
            + ". Use another run.dir for a new run, or checkpoint.resume=never."
        )
    if run["world_size"] == world_size or cfg.deepspeed.stage == 0:
        return False  # without ZeRO every rank holds the whole optimizer state: any world size loads it
    if cfg.deepspeed.offload_optimizer or cfg.deepspeed.offload_params:
        raise ConfigError(
            f"cannot resume from {path}: it was saved by {run['world_size']} ranks and this run has "
            f"{world_size}; with ZeRO-Offload (deepspeed={cfg.deepspeed.name}) zeroforge resumes only on "
            "the same world size. Resume on that many ranks, or without offload."
        )
    log.info("%s was saved by %d ranks; resuming on %d through DeepSpeed's universal checkpoint", path, run["world_size"], world_size)
    return True


def load_checkpoint(engine: DeepSpeedEngine, path: Path) -> dict[str, Any]:
    """Load model, optimizer and scheduler state into the engine; returns our client state."""
    own = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in engine.optimizer.param_groups]
    _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    # DeepSpeed's ZeRO-3 universal loader gives every parameter group the first group's
    # hyperparameters (norms and biases would start to decay), and one `step` tensor to every
    # group's Adam state (which torch's AdamW then advances once per group and step).
    for group, hyperparameters in zip(engine.optimizer.param_groups, own):
        group.update(hyperparameters)
    for state in getattr(engine.optimizer, "optimizer", engine.optimizer).state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()
    if client_state is None:
        raise ConfigError(f"DeepSpeed could not load the checkpoint {path}.")
    log.info("resumed from %s (step %d)", path, client_state["step"])
    return client_state


def export_entries(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What an export holds, named as the plain model names them: parameters and persistent
    buffers in state_dict order, a tied weight once, under its first name (as save_pretrained keeps it)."""
    seen: set[int] = set()
    entries = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            entries.append((name, tensor))
    return entries


def gathered_tensors(model: torch.nn.Module, dist: DistInfo) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
    """The export's tensors (export_entries), each in full on rank 0's host (None elsewhere), one
    at a time: a ZeRO-3 parameter is gathered from every rank (all of them must iterate) and copied
    out before it is partitioned again."""
    import deepspeed

    for name, tensor in export_entries(model):
        if hasattr(tensor, "ds_id"):
            with deepspeed.zero.GatheredParameters([tensor]):
                host = tensor.detach().to("cpu", copy=True) if dist.is_main else None
        else:
            host = tensor.detach().to("cpu") if dist.is_main else None
        yield name, host


def export_hf(
    engine: DeepSpeedEngine,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    dist: DistInfo,
    meta: dict[str, Any],
    shard_bytes: int,
) -> Path:
    """Write config, sharded safetensors weights and tokenizer from the training engine; the
    directory appears complete or not at all. Every rank must call it. Rank 0 writes each tensor as
    it arrives, so its host holds one parameter at a time, whatever the model's size."""
    out = Path(out_dir)
    model = engine.module
    tensors = gathered_tensors(model, dist)
    if dist.is_main:
        specs = [TensorSpec(name, tuple(full_shape(t)), t.dtype) for name, t in export_entries(model)]
        write_export(model.config, specs, tensors, tokenizer, out, meta, shard_bytes)
    else:
        for _ in tensors:
            pass
    barrier()
    return out


def write_export(
    config: PretrainedConfig,
    specs: list[TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    meta: dict[str, Any],
    shard_bytes: int,
) -> None:
    """Write into out.tmp, then swap it in: `out` is always a complete export, old or new. The
    weights (`tensors`, in the order of `specs`) go to disk one at a time as HF's sharded
    safetensors; config.json and generation_config.json are what save_pretrained writes."""
    from transformers import GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = copy.deepcopy(config)
    config.dtype = str(next(s.dtype for s in specs if s.dtype.is_floating_point)).removeprefix("torch.")
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__]
    config.use_cache = True  # training switches the KV cache off; an export is for inference
    config.save_pretrained(tmp)
    GenerationConfig.from_model_config(config).save_pretrained(tmp)
    writer = ShardedWriter(tmp, specs, shard_bytes)
    for name, tensor in tensors:
        writer.write(name, tensor)
    writer.close()
    tokenizer.save_pretrained(str(tmp))
    (tmp / "zeroforge.json").write_text(json.dumps(meta, indent=2))
    old = out.with_name(out.name + ".old")
    if old.exists() and not out.exists():
        old.rename(out)  # an export replaced half-way by a killed run: the old one is the only copy
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    log.info("exported HF weights (%d file(s)) and tokenizer to %s", len(writer.files), out)
