"""Shared test set-up: CPU DeepSpeed, no wandb, one prepared copy of the embedded corpus."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import pytest
from filelock import FileLock

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from omegaconf import DictConfig
    from transformers import PreTrainedModel

    from zeroforge.trainer.topology import Topology

REPO = Path(__file__).resolve().parent.parent
# Two CPU ranks on one machine, as every multi-rank test runs them.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Two ranks share two cores in the multi-rank tests; more threads per rank only thrash.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


def once_per_session(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """The directory `name`, made by build(directory) once per test session. Under pytest-xdist
    (`pytest -n 2`) the workers share it: the first to ask builds it, the others wait on its lock;
    so a session fixture costs its run once, not once per worker. A failed build is retried by the
    next worker that asks (and fails it too)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's directory, above the workers' own
    out = base / "shared" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    done = out.with_name(f"{name}.done")
    with FileLock(str(out.with_name(f"{name}.lock"))):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            build(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """The embedded corpus, prepared once for the whole session (every test shares the cache)."""
    from zeroforge.data.prepare import prepare
    from zeroforge.trainer.config import compose_config

    def build(cache: Path) -> None:
        prepare(compose_config([f"data.cache_dir={cache}"]).data)

    return once_per_session(tmp_path_factory, "data-cache", build)


@pytest.fixture
def smoke_overrides(data_cache: Path, tmp_path: Path) -> list[str]:
    return [
        "experiment=smoke",
        f"data.cache_dir={data_cache}",
        f"run.dir={tmp_path / 'run'}",
        "logging.wandb.mode=disabled",
    ]


def run_module(
    module: str,
    args: Sequence[str],
    cwd: Path,
    timeout: float = 600,
    launcher: Sequence[str] = (),
    env: Optional[dict[str, str]] = None,
) -> subprocess.CompletedProcess:
    """Run a real entry point (`python -m module`, or through `launcher`, e.g. torchrun)."""
    cmd = list(launcher) if launcher else [sys.executable]
    cmd += ["-m", module, *args]
    env = os.environ.copy() if env is None else env
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def exact_overrides(data_cache: Path, run_dir: Path, stage: int) -> list[str]:
    """20 logged fp32 steps of the smoke run: the reference for runs that must match exactly."""
    return [
        "experiment=smoke",
        f"data.cache_dir={data_cache}",
        "logging.wandb.mode=disabled",
        f"run.dir={run_dir}",
        f"deepspeed=zero{stage}",
        "train.precision=fp32",
        "eval.every=0",
        "checkpoint.every=0",
        "logging.every=1",
        "train.steps=20",
    ]


@pytest.fixture(scope="session")
def single_process_run(data_cache: Path, tmp_path_factory) -> Path:
    """`zeroforge train` in one process without ZeRO: what every variant is compared to."""
    return once_per_session(tmp_path_factory, "single", lambda base: _train(exact_overrides(data_cache, base / "run", 0))) / "run"


def _train(args: Sequence[str], launcher: Sequence[str] = (), env: Optional[dict[str, str]] = None) -> str:
    """`zeroforge train` that must succeed: its stdout."""
    result = run_module("zeroforge.trainer.train", args, cwd=REPO, launcher=launcher, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="session")
def two_rank_run(data_cache: Path, tmp_path_factory) -> Callable[..., tuple[Path, str]]:
    """`exact_overrides` on 2 ranks under ZeRO-`stage`, plus `extra` overrides: its run directory
    and stdout. Each runs once per session; the multi-rank, resume and Slurm tests compare against
    the same run."""

    def run(stage: int, *extra: str) -> tuple[Path, str]:
        def build(base: Path) -> None:
            args = [*exact_overrides(data_cache, base / "run", stage), *extra]
            (base / "stdout").write_text(_train(args, launcher=TORCHRUN))

        key = hashlib.sha256(json.dumps([stage, *extra]).encode()).hexdigest()[:12]
        base = once_per_session(tmp_path_factory, f"two-ranks-zero{stage}-{key}", build)
        return base / "run", (base / "stdout").read_text()

    return run


@pytest.fixture(scope="session")
def process_group():
    """A one-rank process group in the test process, for in-process engines. One per session:
    DeepSpeed keeps the groups made on the first. Its port is taken out of the environment at
    once, or later subprocesses would inherit a port that is in use (RANK=0, WORLD_SIZE=1 and
    LOCAL_RANK=0, which DeepSpeed's engines read, say the same as a lone process)."""
    from zeroforge.trainer import distributed

    port = os.environ.get("MASTER_PORT")
    info = distributed.init_distributed("cpu")
    if port is None:
        os.environ.pop("MASTER_PORT")
    else:
        os.environ["MASTER_PORT"] = port
    yield info
    distributed.close()


def _rank_entry(rank: int, world_size: int, port: int, fn: Callable[..., None], args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    fn(*args)


def run_distributed(fn: Callable[..., None], *args: object, world_size: int = 2, timeout_s: Optional[float] = None) -> None:
    """fn(*args) on `world_size` fresh processes with a torchrun rank's environment (they join
    with distributed.init_distributed("cpu"), on gloo); a rank's exception fails the caller with
    its traceback, and ranks still running after timeout_s are killed and fail it. For mechanisms
    below train(); end-to-end tests run torchrun itself."""
    import torch.multiprocessing as mp

    from zeroforge.trainer.distributed import free_port

    context = mp.spawn(_rank_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=False)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if deadline is not None and time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{fn.__name__} on {world_size} ranks did not finish within {timeout_s} s (a hang)")


def smoke_run_overrides(data_cache: Path, run_dir: Path) -> list[str]:
    """The smoke run (20 steps, validation, samples and checkpoints every 10) under 2-rank ZeRO-3,
    in fp32 so that the numbers compared across loaders are exact, with wandb offline."""
    return [
        "experiment=smoke",
        f"data.cache_dir={data_cache}",
        f"run.dir={run_dir}",
        "deepspeed=zero3",
        "train.precision=fp32",
        "logging.wandb.mode=offline",
    ]


@pytest.fixture(scope="session")
def zero3_smoke_run(data_cache: Path, tmp_path_factory) -> Path:
    def build(base: Path) -> None:
        _train(smoke_run_overrides(data_cache, base / "run"), launcher=TORCHRUN, env={**os.environ, "WANDB_DIR": str(base / "wandb")})

    return once_per_session(tmp_path_factory, "zero3-smoke", build) / "run"


@dataclass(frozen=True)
class UserProject:
    """zeroforge installed from its wheel into a fresh virtualenv, and a user's project directory
    with modules named like ours (data.py, trainer.py) and an experiment config of its own."""

    venv: Path
    project: Path
    experiment: dict

    @property
    def bin(self) -> Path:
        return self.venv / "bin"


USER_EXPERIMENT = {
    "run": {"name": "mine"},
    "train": {"steps": 6, "micro_batch_size": 4, "global_batch_size": 8},
    "optim": {"lr": 0.0123, "warmup_steps": 2},
    "data": {"seq_len": 64},
    "logging": {"every": 1},
    "eval": {"every": 0, "batches": 2},
    "checkpoint": {"every": 0},
    "generate": {"max_new_tokens": 8},
}


@pytest.fixture(scope="session")
def user_project(tmp_path_factory) -> UserProject:
    """The wheel is built from a copy of the checkout (no build files land in it) without
    network or build isolation; the venv sees this interpreter's packages (torch and the rest)
    through a .pth file of plain paths, so an editable zeroforge installed here stays invisible."""

    def build(root: Path) -> None:
        source = root / "source"
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for name in ("launcher", "trainer", "data", "conf", "slurm"):
            shutil.copytree(REPO / name, source / name, ignore=ignore)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(REPO / name, source / name)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "-w",
                str(root / "dist"),
                str(source),
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
        venv = root / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=600)
        (Path(next((venv / "lib").glob("python*/site-packages"))) / "zeroforge-test-deps.pth").write_text(
            "\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n"
        )
        wheel = next((root / "dist").glob("zeroforge-*.whl"))
        subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
            check=True,
            capture_output=True,
            timeout=600,
        )
        project = root / "project"
        (project / "myconf" / "experiment").mkdir(parents=True)
        for module in ("data", "trainer", "launcher"):
            # A user's own modules of those names; importing any of them would leave a mark.
            (project / f"{module}.py").write_text("from pathlib import Path\nPath(__file__).with_suffix('.imported').touch()\n")
        (project / "myconf" / "experiment" / "mine.yaml").write_text("# @package _global_\n" + json.dumps(USER_EXPERIMENT) + "\n")

    root = once_per_session(tmp_path_factory, "user", build)
    return UserProject(root / "venv", root / "project", USER_EXPERIMENT)


def engine_for(model: PreTrainedModel, cfg: DictConfig, topology: Topology) -> DeepSpeedEngine:
    """build_engine with the sections of a composed config, as train() passes them."""
    from zeroforge.trainer.engine import build_engine

    return build_engine(model, model_config=cfg.model, train=cfg.train, optim=cfg.optim, deepspeed=cfg.deepspeed, topology=topology)


def model_for_training(cfg: DictConfig, topology: Topology, vocab_size: int, eos_id: Optional[int] = None) -> PreTrainedModel:
    """build_for_training with the sections of a composed config, as train() passes them."""
    from zeroforge.trainer.partitioned import build_for_training

    return build_for_training(
        model_config=cfg.model, optim=cfg.optim, deepspeed=cfg.deepspeed, topology=topology, vocab_size=vocab_size, eos_id=eos_id
    )
