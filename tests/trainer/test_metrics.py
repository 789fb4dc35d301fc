from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import read_metrics
from zeroforge.trainer.config import compose_config
from zeroforge.trainer.distributed import DistInfo
from zeroforge.trainer.metrics import MetricsLogger, Stopwatch, _Sinks, mfu, peak_for_device, peak_tflops, timing
from zeroforge.trainer.topology import Topology


def test_mfu_from_known_flops_and_time() -> None:
    # 1e9 FLOPs per token at 1e5 tokens/s on 2 accelerators of 100 TFLOP/s peak: 1e14 / 2e14.
    assert mfu(1e9, 1e5, world_size=2, peak=100.0) == pytest.approx(0.5)
    assert mfu(1e9, 1e5, world_size=2, peak=None) is None
    assert peak_tflops(989.0, "cpu") == 989.0 and peak_tflops(None, "cpu") is None


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA B200", 2250.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Tesla T4", None),
    ],
)
def test_peak_by_device_name(name: str, peak: float) -> None:
    assert peak_for_device(name) == peak


def test_mfu_of_a_known_model_and_step_time() -> None:
    # llama-8b at seq_len 8192: 6N + 12 L d T FLOPs per token; 4M tokens in 10 s on 64 H100s.
    from zeroforge.launcher.model_shape import model_shape
    from zeroforge.trainer.config import compose_config

    cfg = compose_config(["model=llama-8b", "model.vocab_size=128256", "data.seq_len=8192"])
    shape = model_shape(cfg.model, cfg.data)
    matmul_params = shape.params - shape.vocab_size * shape.hidden  # the input embedding is a lookup
    assert shape.flops_per_token == 6 * matmul_params + 12 * 32 * 4096 * 8192
    tokens_per_s = 4 * 2**20 / 10.0
    expected = shape.flops_per_token * tokens_per_s / (64 * 989e12)
    assert mfu(shape.flops_per_token, tokens_per_s, 64, peak_for_device("NVIDIA H100 80GB HBM3")) == pytest.approx(expected)
    assert 0.3 < expected < 0.5


def test_timing_fields_from_known_inputs() -> None:
    # 10 steps of 8192 tokens in 4 s on 2 ranks, 1 s of it waiting for data.
    assert timing(81920, 4.0, 10, 1.0, world_size=2) == {
        "tokens_per_s": 20480.0,
        "tokens_per_s_per_gpu": 10240.0,
        "step_time_s": 0.4,
        "data_wait_s": 1.0,
        "data_wait_share": 0.25,
    }


class FakeClock:
    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_stopwatch_sums_the_time_inside_blocks_until_a_lap() -> None:
    watch = Stopwatch(clock=FakeClock(0.5))  # every block lasts 0.5 s on this clock
    for _ in range(3):
        with watch:
            pass
    assert watch.lap() == pytest.approx(1.5)
    assert watch.lap() == 0.0


def test_every_record_times_the_steps_since_the_last_one(tmp_path: Path) -> None:
    cfg = compose_config([f"run.dir={tmp_path}", "logging.wandb.mode=disabled", "logging.every=3", "train.steps=6"])
    topology = Topology(
        world_size=2, sequence=1, tensor=1, expert=1, micro_batch_size=1, global_batch_size=2, seq_len=500, device="cpu", precision="fp32"
    )  # 1,000 tokens a step
    logger = MetricsLogger(
        cfg.logging,
        run=cfg.run,
        run_config={},
        steps=cfg.train.steps,
        peak=None,
        dist=DistInfo(rank=0, world_size=2, local_rank=0),
        topology=topology,
        flops_per_token=1e6,
    )
    logger.data_wait.clock = FakeClock(0.25)  # each next_batch() waits 0.25 s
    records = []
    for step in range(1, 7):
        with logger.data_wait:
            pass
        records.append(logger.step(step, torch.tensor(2.0), torch.tensor(1.0), 1e-3))
    logger.close()
    logged = [r for r in records if r is not None]
    assert [r["step"] for r in logged] == [1, 3, 6]
    assert [r["data_wait_s"] for r in logged] == pytest.approx([0.25, 0.5, 0.75])
    previous_tokens = 0
    for record, steps in zip(logged, [1, 2, 3]):
        seconds = record["step_time_s"] * steps
        assert record["tokens_per_s"] * seconds == pytest.approx(record["tokens"] - previous_tokens) == 1000 * steps
        assert record["tokens_per_s_per_gpu"] == pytest.approx(record["tokens_per_s"] / 2)
        assert record["data_wait_share"] == pytest.approx(record["data_wait_s"] / seconds)
        previous_tokens = record["tokens"]
    assert read_metrics(tmp_path) == logged


def test_time_inside_paused_is_left_out_of_the_throughput(tmp_path: Path) -> None:
    cfg = compose_config([f"run.dir={tmp_path}", "logging.wandb.mode=disabled", "logging.every=2", "train.steps=2"])
    topology = Topology(
        world_size=1, sequence=1, tensor=1, expert=1, micro_batch_size=1, global_batch_size=1, seq_len=100, device="cpu", precision="fp32"
    )
    logger = MetricsLogger(
        cfg.logging,
        run=cfg.run,
        run_config={},
        steps=2,
        peak=None,
        dist=DistInfo(rank=0, world_size=1, local_rank=0),
        topology=topology,
        flops_per_token=1e6,
    )
    logger.step(1, torch.tensor(2.0), None, 1e-3)
    with logger.paused:  # a checkpoint or a validation between the steps
        time.sleep(0.5)
    record = logger.step(2, torch.tensor(2.0), None, 1e-3)
    logger.close()
    assert record is not None and record["step_time_s"] < 0.25  # without the pause it would be over 0.5 s


def test_smoke_run_records_throughput_step_time_and_data_wait(single_process_run: Path) -> None:
    train = [r for r in read_metrics(single_process_run) if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 21))  # logging.every=1: one step per record
    for record in train:
        assert record["tokens_per_s_per_gpu"] == record["tokens_per_s"] > 0  # one rank
        assert record["tokens_per_s"] * record["step_time_s"] == pytest.approx(8 * 64)  # smoke: 8 x 64 tokens a step
        assert 0 < record["data_wait_s"] <= record["step_time_s"]  # next_batch() is timed
        assert record["data_wait_share"] == pytest.approx(record["data_wait_s"] / record["step_time_s"])
        assert record["grad_norm"] > 0 and record["lr"] >= 0 and record["mem_gb"] > 0 and record["skipped_steps"] == 0
        assert record["mfu"] is None  # no peak is known on the CPU


def test_smoke_run_config_records_the_system(single_process_run: Path) -> None:
    system = OmegaConf.load(single_process_run / "config.yaml").system
    assert system["gpu_count"] == torch.cuda.device_count() and system["gpu"]
    assert system["hostname"] == socket.gethostname()
    assert system["slurm_job_id"] == os.environ.get("SLURM_JOB_ID")
    assert system["versions"]["torch"] == torch.__version__
    assert set(system["versions"]) == {"python", "zeroforge", "torch", "deepspeed", "transformers", "datasets"}


def test_a_restarted_run_continues_the_same_wandb_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # wandb's own settings and caches go to the test's directory, not the home directory.
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = compose_config([f"run.dir={run_dir}", "logging.wandb.mode=offline"])
    ids = []
    for attempt in range(2):  # the first run, then its restart from step 1
        sinks = _Sinks(cfg.logging, cfg.run, {"seed": cfg.seed}, start_step=attempt)
        sinks.write({"step": attempt + 1, "loss": 8.0})
        ids.append(sinks.wandb.id)
        sinks.close()
    assert ids[0] == ids[1] == (run_dir / "wandb_id").read_text().strip()
    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(p.name.endswith(ids[0]) for p in attempts)
