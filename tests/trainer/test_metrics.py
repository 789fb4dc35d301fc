from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import read_metrics
from zeroforge.trainer.config import compose_config
from zeroforge.trainer.distributed import DistInfo
from zeroforge.trainer.metrics import MetricsLogger, Stopwatch, _Sinks, mfu, peak_for_device, peak_tflops, timing
from zeroforge.trainer.stragglers import StragglerWatch
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


class ManualClock:
    """Seconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_stopwatch_sums_the_time_inside_blocks_until_a_lap() -> None:
    clock = ManualClock()
    watch = Stopwatch(clock=clock)
    for _ in range(3):
        with watch:
            clock.advance(0.5)
        clock.advance(1.0)  # outside the blocks: not counted
    assert watch.lap() == 1.5
    assert watch.lap() == 0.0


def _logger(tmp_path: Path, every: int, steps: int, world_size: int, seq_len: int, clock: ManualClock) -> MetricsLogger:
    """One sample a rank per step, so a step is world_size x seq_len tokens."""
    cfg = compose_config([f"run.dir={tmp_path}", "logging.wandb.mode=disabled", f"logging.every={every}", f"train.steps={steps}"])
    topology = Topology(
        world_size=world_size,
        sequence=1,
        tensor=1,
        expert=1,
        micro_batch_size=1,
        global_batch_size=world_size,
        seq_len=seq_len,
        device="cpu",
        precision="fp32",
    )
    return MetricsLogger(
        cfg.logging,
        run=cfg.run,
        run_config={},
        steps=steps,
        peak=None,
        dist=DistInfo(rank=0, world_size=world_size, local_rank=0),
        topology=topology,
        flops_per_token=1e6,
        stragglers=StragglerWatch(DistInfo(rank=0, world_size=1, local_rank=0), factor=1.5, intervals=3, hosts=["here"]),
        clock=clock,
    )


def test_every_record_times_the_steps_since_the_last_one(tmp_path: Path) -> None:
    clock = ManualClock()
    logger = _logger(tmp_path, every=3, steps=6, world_size=2, seq_len=500, clock=clock)  # 1,000 tokens a step
    records = []
    for step in range(1, 7):
        with logger.data_wait:  # next_batch() waits 0.25 s
            clock.advance(0.25)
        clock.advance(0.75 if step <= 3 else 1.75)  # 1 s a step, then 2 s from step 4 on
        records.append(logger.step(step, torch.tensor(2.0), torch.tensor(1.0), 1e-3))
    logger.close()
    logged = [r for r in records if r is not None]
    fields = ["step", "tokens", "tokens_per_s", "tokens_per_s_per_gpu", "step_time_s", "data_wait_s", "data_wait_share"]
    # The records at steps 1, 3 and 6 time steps 1, 2-3 and 4-6.
    assert [[r[k] for k in fields] for r in logged] == [
        [1, 1000, 1000.0, 500.0, 1.0, 0.25, 0.25],
        [3, 3000, 1000.0, 500.0, 1.0, 0.5, 0.25],
        [6, 6000, 500.0, 250.0, 2.0, 0.75, 0.125],
    ]
    assert read_metrics(tmp_path) == logged


def test_time_inside_paused_is_left_out_of_the_throughput(tmp_path: Path) -> None:
    clock = ManualClock()
    logger = _logger(tmp_path, every=2, steps=2, world_size=1, seq_len=100, clock=clock)
    clock.advance(2.0)
    logger.step(1, torch.tensor(2.0), None, 1e-3)
    with logger.paused:  # a checkpoint or a validation between the steps
        clock.advance(5.0)
    clock.advance(0.5)
    record = logger.step(2, torch.tensor(2.0), None, 1e-3)
    logger.close()
    assert record is not None and record["step_time_s"] == 0.5 and record["tokens_per_s"] == 200.0


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


def test_lines_that_are_not_records_never_stop_a_resume_and_are_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = compose_config([f"run.dir={run_dir}", "logging.wandb.mode=disabled"])
    record = [b'{"step": %d, "loss": 8.0}\n' % step for step in range(1, 5)]
    garbage = b"\xff\xfe not json, not UTF-8\n"
    torn = b'{"step": 5, "lo'  # a kill mid-write
    (run_dir / "metrics.jsonl").write_bytes(record[0] + record[1] + garbage + record[2] + record[3] + torn)

    with caplog.at_level("WARNING", logger="zeroforge"):
        _Sinks(cfg.logging, cfg.run, {}, start_step=3).close()
    assert (run_dir / "metrics.jsonl").read_bytes() == record[0] + record[1] + record[2]
    # Nothing is lost: every other line, byte for byte and in order, is with the superseded records.
    assert (run_dir / "metrics.superseded.jsonl").read_bytes() == garbage + record[3] + torn + b"\n"
    assert "metrics.jsonl line 3 is not a JSON record" in caplog.text and "metrics.jsonl line 6" in caplog.text

    _Sinks(cfg.logging, cfg.run, {}, start_step=3).close()  # resumed again: nothing left to move
    assert (run_dir / "metrics.jsonl").read_bytes() == record[0] + record[1] + record[2]
