"""The entry points' shared behaviour: Hydra's options may come after overrides, and a config
composed from anywhere reaches the ranks frozen in run.dir/job.yaml."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from zeroforge.launcher.cli import main as zeroforge
from zeroforge.trainer.config import compose_config
from zeroforge.trainer.entry import hydra_arguments
from zeroforge.trainer.rundir import JOB_CONFIG, write_job_config


def test_hydra_options_go_before_the_overrides() -> None:
    args = ["cluster=slurm", "--config-dir", "./myconf", "experiment=mine", "-m", "--cfg=job", "--info", "defaults", "a=1"]
    assert hydra_arguments(args) == [
        "--config-dir",
        "./myconf",
        "-m",
        "--cfg=job",
        "--info",
        "defaults",
        "cluster=slurm",
        "experiment=mine",
        "a=1",
    ]
    assert hydra_arguments(["--info", "a=1"]) == ["--info", "a=1"]  # --info's topic is optional
    # A relative --config-path is the user's directory, not one inside zeroforge's package.
    here = str(Path("myconf").absolute())
    assert hydra_arguments(["--config-path", "myconf"]) == ["--config-path", here]
    assert hydra_arguments(["-cp=myconf"]) == [f"-cp={here}"]
    assert hydra_arguments(["--config-path", "pkg://zeroforge.conf"]) == ["--config-path", "pkg://zeroforge.conf"]


def test_the_frozen_job_config_composes_to_the_same_config(tmp_path: Path) -> None:
    cfg = compose_config(["experiment=smoke", "optim.lr=0.01", "deepspeed=zero3", f"run.dir={tmp_path / 'run'}"])
    # A string the user escaped stays a string (a prompt for a code model), and YAML's look-alikes stay strings.
    cfg.eval.sample_prompts = ["echo \\${HOME}", "yes", "1e3", "null"]
    options = write_job_config(cfg)
    assert options == ["--config-path", str(tmp_path / "run"), "--config-name", JOB_CONFIG]
    with initialize_config_dir(config_dir=options[1], version_base="1.3"):
        frozen = compose(config_name=options[3])
    expected = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert OmegaConf.to_container(frozen, resolve=True, enum_to_str=True) == expected
    assert frozen.checkpoint.dir == str(tmp_path / "run" / "checkpoints")  # resolved, absolute
    assert list(frozen.eval.sample_prompts) == ["echo ${HOME}", "yes", "1e3", "null"]
    # Still type-checked against the schema: a frozen value keeps its type and rules.
    assert OmegaConf.get_type(frozen, "train") is type(OmegaConf.to_object(cfg.train))


def _dry_run_job_name(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, args: list[str]) -> str:
    monkeypatch.setattr(sys, "argv", ["zeroforge"])
    zeroforge(["launch", *args, "cluster=slurm", "cluster.nproc_per_node=1", "launcher.dry_run=true"])
    command = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sbatch "))
    return next(arg for arg in shlex.split(command) if arg.startswith("--job-name=")).split("=", 1)[1]


def test_configs_from_a_search_path_or_a_primary_config_by_path_are_composed(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = tmp_path / "myconf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("# @package _global_\nrun:\n  name: mine\n")
    (tmp_path / "myconf" / "myrun.yaml").write_text(
        "# A primary config of one's own, on top of zeroforge's.\n"
        "defaults: [config, _self_]\nhydra:\n  searchpath: [pkg://zeroforge.conf]\nrun:\n  name: bypath\n"
    )
    run_dir = f"run.dir={tmp_path / 'run'}"
    assert _dry_run_job_name(capsys, monkeypatch, ["--config-dir", str(tmp_path / "myconf"), "experiment=mine", run_dir]) == "mine"
    assert (
        _dry_run_job_name(capsys, monkeypatch, [f"hydra.searchpath=[file://{tmp_path / 'myconf'}]", "experiment=mine", run_dir]) == "mine"
    )
    assert (
        _dry_run_job_name(capsys, monkeypatch, ["--config-path", str(tmp_path / "myconf"), "--config-name", "myrun", run_dir]) == "bypath"
    )
