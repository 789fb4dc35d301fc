"""Checkpoints that commit atomically, the resume rules, and loading a checkpoint into the engine.

A save goes through DeepSpeed into step_<N>.tmp; after every rank has written, the files are
hashed (each rank a share), rank 0 writes manifest.json, renames the directory to step_<N> and
only then moves the `latest` pointer (write, fsync, rename, fsync the directory). A checkpoint
whose manifest does not verify is never loaded: loading falls back to the newest one that does.
Its files are unpickled as weights only (trainer/safe_load.py), and one that pickles anything
else is refused before any is loaded.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from zeroforge.data.build import resume_problems
from zeroforge.data.config import DataConfig, plain
from zeroforge.trainer.background_save import BackgroundWriter, file_entry
from zeroforge.trainer.config import CheckpointConfig, ConfigError, DeepSpeedConfig, ModelConfig
from zeroforge.trainer.distributed import DistInfo, barrier, from_rank_zero, gather
from zeroforge.trainer.model import model_differences
from zeroforge.trainer.safe_load import foreign_types, weights_only_loads
from zeroforge.trainer.train_state import TrainState
from zeroforge.trainer.universal import converts

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

log = logging.getLogger("zeroforge")

LATEST = "latest"
MANIFEST = "manifest.json"
OLD = ".old"
_DELETING = ".deleting"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_FOREIGN = (
    "A zeroforge checkpoint holds only tensors and the few types DeepSpeed saves (trainer/safe_load.py), "
    "and loading anything else would run code the file names. Resume from a checkpoint this run wrote "
    "(checkpoint.resume=<path>), or use checkpoint.resume=never in a new run.dir."
)


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
    """Saves the engine and the TrainState through DeepSpeed into step_<N>.tmp and commits
    atomically, then applies retention; loads them back for a resume.

    `identity` is what every checkpoint records of the run beside its state (the tokenizer hash,
    world size, config and library versions), for the resume checks and the harness.
    With checkpoint.async_save the files are written by a background thread
    (trainer/background_save.py) and the commit waits for commit_pending(), which the training
    loop calls after the next step: the loop blocks only for the snapshot.
    """

    def __init__(self, engine: DeepSpeedEngine, cfg: CheckpointConfig, dist: DistInfo, identity: dict[str, Any]):
        self.engine, self.cfg, self.dist, self.identity = engine, cfg, dist, identity
        self.root = Path(cfg.dir)
        self.writer: Optional[BackgroundWriter] = None
        if cfg.async_save:
            self.writer = BackgroundWriter(engine.checkpoint_engine.zipfile_serialization)
            engine.checkpoint_engine = self.writer
        self._in_flight: Optional[_InFlight] = None

    def maybe_save(self, state: Callable[[], TrainState], step: int, final: bool = False) -> None:
        """Save at checkpoint.every's cadence, and whenever `final` (the last step, an exit or a stop
        request: the process ends next, so the checkpoint also commits at once). `state` is called
        only for a save (it gathers from every rank). Every rank must call it."""
        if not final and not (self.cfg.every and step % self.cfg.every == 0):
            return
        self.save(state())
        if final:
            self.commit_pending()

    def save(self, state: TrainState) -> float:
        """Every rank must call it. Returns the seconds the caller was blocked."""
        started = time.perf_counter()
        self.commit_pending()  # one save in flight at a time
        final = self.root / step_tag(state.step)
        tmp = self.root / (step_tag(state.step) + ".tmp")
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
        barrier()
        client_state = {**state.state_dict(), **self.identity}
        self.engine.save_checkpoint(str(self.root), tag=tmp.name, client_state=client_state, save_latest=False)
        # What a resume must check before DeepSpeed touches the files (a model of another shape
        # fails inside DeepSpeed's loader, not with a clear message).
        run = {k: client_state[k] for k in ("tokens", "data", "tokenizer_hash", "world_size", "expert_parallel")}
        run["model"] = self.identity["config"]["model"]
        self._in_flight = _InFlight(state.step, tmp, final, run)
        if self.writer is None:
            self.commit_pending()
        return time.perf_counter() - started

    def load(self, path: Path) -> TrainState:
        """Load model, optimizer and scheduler state into the engine; returns the TrainState."""
        engine = self.engine
        own = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in engine.optimizer.param_groups]
        try:
            with weights_only_loads():
                _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
        except pickle.UnpicklingError as err:  # what _refuse_foreign_objects could not see in the pickles
            refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
            found = f"a file pickles {refused.group(1)}" if refused else str(err)
            raise ConfigError(f"refusing to resume from {path}: {found}. {_FOREIGN}") from None
        # DeepSpeed's ZeRO-3 universal loader gives every parameter group the first group's
        # hyperparameters (norms and biases would start to decay), and one `step` tensor to every
        # group's Adam state (which torch's AdamW then advances once per group and step).
        for group, hyperparameters in zip(engine.optimizer.param_groups, own):
            group.update(hyperparameters)
        for adam_state in getattr(engine.optimizer, "optimizer", engine.optimizer).state.values():
            if isinstance(adam_state.get("step"), torch.Tensor):
                adam_state["step"] = adam_state["step"].clone()
        if client_state is None:
            raise ConfigError(f"DeepSpeed could not load the checkpoint {path}.")
        log.info("resumed from %s (step %d)", path, client_state["step"])
        return TrainState.from_state_dict(client_state)

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
    # The same step saved again after a resume: the old copy goes only once the new one is in
    # place. A kill between the two renames leaves step_<N>.old alone, which the next start-up
    # renames back (finish_interrupted_commits).
    old = final.with_name(final.name + OLD)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    _fsync(root)
    if old.exists():
        _delete(old)
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
    doomed += [p for p in root.glob("step_*.*") if p.suffix in (".tmp", OLD, _DELETING) and _step_of(p) < newest]
    for path in doomed:
        _delete(path)
        log.info("retention: removed %s", path)
    return doomed


def _delete(path: Path) -> None:
    """Renamed first, so a deletion cut short never leaves a directory that looks committed (or
    like a step_<N>.old that start-up would restore)."""
    dying = path.with_name(path.name.split(".")[0] + _DELETING)
    if path != dying:
        shutil.rmtree(dying, ignore_errors=True)  # left by a deletion cut short
        path.rename(dying)
    shutil.rmtree(dying, ignore_errors=True)


def _step_of(path: Path) -> int:
    return int(path.name.split(".")[0].split("_")[1])


def committed_checkpoints(root: str | Path) -> list[Path]:
    """Committed step directories, newest first (never a .tmp one)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def interrupted_resaves(root: str | Path) -> list[Path]:
    """step_<N>.old directories without their step_<N>: a save of a step that was already committed
    was killed between moving the committed copy aside and moving the new one in, so the old copy
    is still step N's committed checkpoint."""
    return [p for p in _old_copies(Path(root)) if (p / MANIFEST).exists() and not p.with_suffix("").exists()]


def _old_copies(root: Path) -> list[Path]:
    return [p for p in root.glob(f"step_*{OLD}") if _STEP_DIR.match(p.stem)] if root.is_dir() else []


def finish_interrupted_commits(root: Path) -> None:
    """Rank 0 at start-up: an interrupted re-save's step_<N>.old goes back to step_<N>; one beside
    its step_<N> (the kill came after the new copy was in place) is deleted."""
    restored = interrupted_resaves(root)
    for old in restored:
        old.rename(old.with_suffix(""))
        log.warning("restored %s: a save of the same step was cut short before it committed", old.with_suffix(""))
    if restored:
        _fsync(root)
    for old in _old_copies(root):
        if old.with_suffix("").exists():
            _delete(old)
            log.info("removed %s: the save that replaced it had committed", old)


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
    if dist.is_main:
        finish_interrupted_commits(root)
    barrier()
    if resume != "auto":
        path = Path(resume)
        problem = _verify(path, dist)
        if problem:
            raise ConfigError(f"checkpoint.resume={resume}: that checkpoint cannot be loaded ({problem}).")
        _refuse_foreign_objects(path, dist)
        _abandon_newer_than(root, path, dist)
        return path
    candidates = from_rank_zero(committed_checkpoints(root) if dist.is_main else None, dist)
    problems = []
    for candidate in candidates:
        problem = _verify(candidate, dist)
        if problem is None:
            _refuse_foreign_objects(candidate, dist)
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


def _refuse_foreign_objects(path: Path, dist: DistInfo) -> None:
    """ConfigError on every rank when a file of the checkpoint (its universal form included) pickles
    anything but tensors and the types DeepSpeed saves: loading it would run code the file names.
    Only each file's pickle is read, each rank a share. Not a fallback to an older checkpoint as
    for a damaged one: a committed checkpoint with such a file was written by something else."""
    # Every file DeepSpeed could load, whether the manifest lists it or not; not the scratch of a
    # conversion to the universal form that was cut short (`*.tmp`), which is never loaded.
    pickles = [p.relative_to(path) for p in path.rglob("*.pt")]
    files = from_rank_zero(
        sorted(str(p) for p in pickles if not any(d.endswith(".tmp") for d in p.parts[:-1])) if dist.is_main else None, dist
    )
    found = []
    for name in _my_share(files, dist):
        try:
            types = foreign_types(path / name)
        except (OSError, ValueError, RuntimeError) as err:
            found.append(f"{name} cannot be read as a torch.save archive ({err})")
            continue
        if types:
            found.append(f"{name} pickles {', '.join(types)}")
    problems = [p for part in gather(found, dist) for p in part]
    if problems:
        raise ConfigError(f"refusing to resume from {path}: {'; '.join(problems)}. {_FOREIGN}")


def _abandon_newer_than(root: Path, chosen: Path, dist: DistInfo) -> None:
    """Checkpoints newer than the one resumed belong to a timeline that is being replaced: move
    them to abandoned/, so a later auto-resume or retention never mistakes them for this run's."""
    if dist.is_main and chosen.parent == root:
        newer = [p for p in committed_checkpoints(root) if _step_of(p) > _step_of(chosen)]
        for path in newer:
            (root / "abandoned").mkdir(exist_ok=True)
            target = _free_name(root / "abandoned" / path.name)
            path.rename(target)
            log.warning("moved %s to %s: the run resumes from the older %s", path.name, target, chosen.name)
        if newer:
            _fsync(root)
    barrier()


def _free_name(path: Path) -> Path:
    """`path`, or path.1, path.2, ... where a timeline abandoned earlier already holds that step."""
    found, n = path, 0
    while found.exists():
        n += 1
        found = path.with_name(f"{path.name}.{n}")
    return found


def saved_run(path: Path) -> dict[str, Any]:
    """The run that saved a committed checkpoint (model, data, tokenizer, world size), from its manifest."""
    run = json.loads((path / MANIFEST).read_text()).get("run")
    if run is None:
        raise ConfigError(f"cannot resume from {path}: its manifest has no run section (an older format).")
    return run


def saved_expert_parallel(run: dict[str, Any]) -> int:
    """The parallel.expert that saved a checkpoint (1 before it was recorded)."""
    return int(run.get("expert_parallel", 1))


def check_resumable(
    path: Path,
    *,
    model: ModelConfig,
    data: DataConfig,
    seed: int,
    deepspeed: DeepSpeedConfig,
    data_manifest: dict,
    world_size: int,
    expert: int = 1,
) -> bool:
    """Refuse to continue a run as a different one (steps, cadences and such may change).

    Returns whether the checkpoint was saved by another world size (or parallel.expert) with
    partitioned (ZeRO) optimizer state, which only DeepSpeed's universal form of it can load.
    """
    run = saved_run(path)
    problems = model_differences(run["model"], plain(model))
    problems += resume_problems(run["data"], data_manifest, data, seed)
    if run["tokenizer_hash"] != data_manifest["tokenizer_hash"]:
        problems.append(f"tokenizer: checkpoint {run['tokenizer_hash']}, now {data_manifest['tokenizer_hash']}")
    if problems:
        raise ConfigError(
            f"cannot resume from {path}: the run differs in "
            + "; ".join(problems)
            + ". Use another run.dir for a new run, or checkpoint.resume=never."
        )
    saved_expert = saved_expert_parallel(run)
    if saved_expert != expert and not converts(deepspeed):
        raise ConfigError(
            f"cannot resume from {path}: it was saved with parallel.expert={saved_expert} and this run has parallel.expert={expert}; "
            f"only DeepSpeed's universal checkpoint moves experts between ranks, which deepspeed={deepspeed.name} does not write. "
            f"Resume with parallel.expert={saved_expert}."
        )
    if saved_expert != expert:
        log.info(
            "%s was saved with parallel.expert=%d; resuming with parallel.expert=%d through DeepSpeed's universal checkpoint",
            path,
            saved_expert,
            expert,
        )
        return True
    if run["world_size"] == world_size or deepspeed.stage == 0:
        return False  # without ZeRO every rank holds the whole optimizer state: any world size loads it
    if not converts(deepspeed):
        raise ConfigError(
            f"cannot resume from {path}: it was saved by {run['world_size']} ranks and this run has "
            f"{world_size}; with ZeRO-Offload (deepspeed={deepspeed.name}) zeroforge resumes only on "
            "the same world size. Resume on that many ranks, or without offload."
        )
    log.info("%s was saved by %d ranks; resuming on %d through DeepSpeed's universal checkpoint", path, run["world_size"], world_size)
    return True
