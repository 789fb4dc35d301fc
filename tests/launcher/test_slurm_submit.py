"""`zeroforge launch` on a Slurm cluster kind: the sbatch command comes from the cluster config."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from tests.conftest import REPO, run_module
from zeroforge.launcher.job import first_config, job_arguments
from zeroforge.launcher.slurm import SCRIPT, sbatch_command
from zeroforge.trainer.config import compose_config
from zeroforge.trainer.rundir import job_config_options, write_job_config
from zeroforge.trainer.validate import check_fields, slurm_time_limit_s

H100_1B = ["cluster=h100", "model=llama-1b", "train.global_batch_size=512"]


def test_sbatch_command_carries_the_placement_and_the_frozen_config(tmp_path: Path) -> None:
    overrides = [
        *H100_1B,
        "cluster.nodes=2",
        "cluster.partition=gpu",
        "cluster.account=proj",
        "cluster.qos=high",
        "cluster.constraint=h100",
        "cluster.exclude='node[07-08]'",
        "cluster.time=2-00:00:00",
        "cluster.warning_s=600",
        "cluster.sbatch_args=[--exclusive]",
        "launcher.dry_run=true",
        f"run.dir={tmp_path / 'run'}",
    ]
    cfg = compose_config(overrides)
    cmd = sbatch_command(cfg.cluster, cfg.run, job_config_options(tmp_path / "run"))
    script_at = cmd.index(str(SCRIPT))
    assert cmd[:script_at] == [
        "sbatch",
        "--job-name=default",
        "--nodes=2",
        "--gpus-per-node=8",
        "--time=2-00:00:00",
        "--signal=B:USR1@600",
        f"--output={tmp_path / 'run'}/logs/slurm-%j.out",
        "--account=proj",
        "--partition=gpu",
        "--qos=high",
        "--constraint=h100",
        "--exclude=node[07-08]",
        "--exclusive",
    ]
    # The job composes the config the launcher froze in run.dir, absolute, from any working directory.
    assert cmd[script_at + 1 :] == ["--config-path", str(tmp_path / "run"), "--config-name", "job"]


def test_dry_run_prints_the_command_and_the_script_and_submits_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_module(
        "zeroforge.launcher",
        [*H100_1B, "cluster.nodes=4", "launcher.dry_run=true", f"run.dir={run_dir}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    command = shlex.split(next(line for line in result.stdout.splitlines() if line.startswith("sbatch ")))
    assert command[0] == "sbatch" and "--nodes=4" in command and str(SCRIPT) in command
    assert "#SBATCH --requeue" in result.stdout and "zeroforge.launcher.torchrun" in result.stdout
    assert not run_dir.exists()


def test_a_sweep_submits_one_job_per_point_each_in_its_own_run_directory(tmp_path: Path) -> None:
    result = run_module(
        "zeroforge.launcher",
        ["-m", *H100_1B, "optim.lr=1e-3,2e-3", "launcher.dry_run=true", f"run.dir={tmp_path / 'sweep'}"],
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    commands = [shlex.split(line) for line in result.stdout.splitlines() if line.startswith("sbatch ")]
    assert len(commands) == 2
    run_dirs = [Path(c[c.index("--config-path") + 1]) for c in commands]
    assert [d.parent for d in run_dirs] == [tmp_path / "sweep"] * 2
    assert ["optim.lr=0.001" in d.name for d in run_dirs] == [True, False]


def test_slurm_time_limits_in_seconds() -> None:
    # Every format sbatch --time accepts; Slurm rounds seconds up to whole minutes.
    assert slurm_time_limit_s("30") == 30 * 60
    assert slurm_time_limit_s("5:00") == 5 * 60
    assert slurm_time_limit_s("5:30") == 6 * 60
    assert slurm_time_limit_s("24:00:00") == 24 * 3600
    assert slurm_time_limit_s("1:90:00") == 150 * 60
    assert slurm_time_limit_s("1-12") == 36 * 3600
    assert slurm_time_limit_s("2-00:30") == 48 * 3600 + 30 * 60
    assert slurm_time_limit_s("2-00:00:10") == 48 * 3600 + 60
    for no_limit in ("0", "00:00:00", "UNLIMITED", "INFINITE", "unlimited"):
        assert slurm_time_limit_s(no_limit) is None


@pytest.mark.parametrize("value", ["forever", "", "2h", "1.5", "30 ", "1:2:3:4", "1-2:3:4:5", "1-2-3", ":30", "٣٠"])
def test_a_time_sbatch_refuses_is_not_a_slurm_time_limit(value: str) -> None:
    with pytest.raises(ValueError, match="not a Slurm time limit"):
        slurm_time_limit_s(value)
    assert "cluster.time" in check_fields(compose_config([f"cluster.time='{value}'"]))


def test_a_time_limit_within_the_warning_is_refused_before_submitting(tmp_path: Path) -> None:
    # Slurm would send the stop warning as the job starts, and the job would die with an empty log.
    result = run_module(
        "zeroforge.launcher",
        [*H100_1B, "cluster.time=00:05:00", "launcher.dry_run=true", f"run.dir={tmp_path / 'run'}"],
        cwd=REPO,
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "cluster.time=00:05:00 (300 s) must be longer than cluster.warning_s=300" in result.stderr
    assert "sbatch " not in result.stdout


def test_local_cluster_refuses_several_nodes(tmp_path: Path) -> None:
    result = run_module("zeroforge.launcher", ["cluster.nodes=2", f"run.dir={tmp_path / 'run'}"], cwd=REPO)
    assert result.returncode == 2
    assert "cluster=local runs on this machine alone, but cluster.nodes=2" in result.stderr


def test_the_script_header_holds_the_slurm_cluster_defaults() -> None:
    """Direct `sbatch slurm/pretrain.sh` users get the header; launcher users get the config: the same numbers."""
    header = dict(
        line.removeprefix("#SBATCH --").partition("=")[::2] for line in SCRIPT.read_text().splitlines() if line.startswith("#SBATCH --")
    )
    assert "requeue" in header
    c = compose_config(["cluster=slurm"]).cluster
    assert header["nodes"] == str(c.nodes)
    assert header["gpus-per-node"] == str(c.gpus_per_node)
    assert header["time"] == c.time
    assert header["signal"] == f"B:USR1@{c.warning_s}"


def test_the_job_composes_the_scripts_arguments_on_its_allocation() -> None:
    env = {"SLURM_JOB_NUM_NODES": "4"}
    # The generic Slurm cluster unless the arguments choose one; the node count is the allocation's.
    assert job_arguments(["model=llama-1b"], env) == ["cluster=slurm", "model=llama-1b", "cluster.nodes=4"]
    assert job_arguments(["cluster=h100", "--config-dir", "myconf", "experiment=mine"], env) == [
        "cluster=h100",
        "--config-dir",
        "myconf",
        "experiment=mine",
        "cluster.nodes=4",
    ]
    # The launcher's frozen config already holds its cluster.
    frozen = ["--config-path", "/runs/x", "--config-name", "job"]
    assert job_arguments(frozen, env) == [*frozen, "cluster.nodes=4"]


def test_a_requeued_job_keeps_the_config_it_started_with(tmp_path: Path, caplog) -> None:
    run_dir = tmp_path / "run"
    started = compose_config(["experiment=smoke", "cluster=slurm", "optim.lr=0.01", f"run.dir={run_dir}"])
    write_job_config(started)
    edited = compose_config(["experiment=smoke", "cluster=slurm", "optim.lr=0.02", "cluster.nodes=3", f"run.dir={run_dir}"])
    assert first_config(edited, {"SLURM_RESTART_COUNT": "0"}) is edited  # a first start composes its arguments
    kept = first_config(edited, {"SLURM_RESTART_COUNT": "1"})
    assert kept.optim.lr == 0.01 and kept.cluster.nodes == 3  # the frozen config, on this allocation
    assert "optim.lr" in caplog.text and "config files changed" in caplog.text


def test_a_launch_validates_once_per_process(tmp_path: Path) -> None:
    """The launcher derives the topology once and hands it to the plan and the checks."""
    result = run_module(
        "zeroforge.launcher",
        [*H100_1B, "launcher.dry_run=true", "logging.level=DEBUG", f"run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    validated = [line for line in result.stdout.splitlines() if "config validated" in line]
    assert len(validated) == 1, validated
    assert "world_size=8" in validated[0] and "device='cuda'" in validated[0] and "precision='bf16'" in validated[0]


def test_a_gpu_cluster_job_keeps_its_gpu_kernels_when_launched_from_a_cpu_machine(tmp_path: Path) -> None:
    """A login node without GPUs submits a flash_attention_2 job to H100 nodes: the kernel check
    asks the cluster's nodes, not the login node. The same request on this CPU machine is refused.
    flash-attn cannot be installed without CUDA, so an importable package of that name stands in
    for it: what is tested is which machine the check asks about."""
    package = tmp_path / "site" / "flash_attn"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    flash = ["model.attn_implementation=flash_attention_2", f"run.dir={tmp_path / 'run'}", "logging.wandb.mode=disabled"]
    on_h100 = run_module("zeroforge.launcher", [*H100_1B, "launcher.dry_run=true", *flash], cwd=tmp_path, env=env)
    assert on_h100.returncode == 0, on_h100.stderr[-3000:]
    assert any(line.startswith("sbatch ") for line in on_h100.stdout.splitlines())
    here = run_module("zeroforge.launcher", ["cluster=local", *flash], cwd=tmp_path, env=env)
    assert here.returncode == 2, here.stdout[-2000:] + here.stderr[-2000:]
    assert "flash_attention_2 runs on CUDA GPUs only, and this run is on the CPU" in here.stderr
