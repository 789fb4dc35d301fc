"""Streaming mode: packed on the fly, the same windows after any stops, ranks and workers."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

from tests.conftest import REPO, read_metrics, run_module, train_losses
from zeroforge.data.build import open_data
from zeroforge.data.corpus import is_validation
from zeroforge.data.errors import DataError
from zeroforge.data.packing import PackedStream
from zeroforge.data.stream import StreamData, StreamLoader
from zeroforge.data.tokenizer import load_tokenizer, train_bpe
from zeroforge.trainer.config import compose_config

SEQ = 16
GLOBAL = 8
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


@dataclass
class Corpus:
    files: list[Path]
    texts: list[str]  # every row's text, in source order (empty ones included)
    tokenizer: Path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    """Two jsonl files of short and long documents (some longer than a window, some empty), and a
    small BPE trained on them."""
    root = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 40)))) for _ in range(160)]
    texts[7] = texts[90] = ""
    files = [root / "a.jsonl", root / "b.jsonl"]
    for path, part in zip(files, (texts[:100], texts[100:])):
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    train_bpe([t for t in texts if t], 300).save_pretrained(str(root / "tokenizer"))
    return Corpus(files, texts, root / "tokenizer")


def _overrides(corpus: Corpus, *extra: str) -> list[str]:
    files = ",".join(str(f) for f in corpus.files)
    return [
        "data.mode=stream", "data.source=json", f"data.data_files=[{files}]", f"data.tokenizer={corpus.tokenizer}",
        f"data.seq_len={SEQ}", "data.validation_fraction=0.1", *extra,
    ]


def _cfg(corpus: Corpus, *overrides: str):
    return compose_config(_overrides(corpus, *overrides)).data


def _loaders(corpus: Corpus, dp_size: int, state: Optional[dict] = None, num_workers: int = 0) -> list[StreamLoader]:
    data = StreamData(_cfg(corpus, f"data.num_workers={num_workers}"))
    loaders = [data.loader(seed=0, global_batch=GLOBAL, micro_batch=2, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint manifest holds it
    return loaders


def _steps(loaders: list[StreamLoader], steps: int) -> list[torch.Tensor]:
    """Each global batch's rows, ranks in order."""
    return [torch.cat([torch.cat(loader.next_batch()) for loader in loaders]) for _ in range(steps)]


def _train_tokens(corpus: Corpus) -> list[int]:
    """One epoch of the train token stream, built directly: each train document's tokens + EOS."""
    tok = load_tokenizer(corpus.tokenizer)
    out: list[int] = []
    for row, text in enumerate(corpus.texts):
        if text.strip() and not is_validation(str(row), 0.1):
            out += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return out


def test_windows_are_the_packed_train_documents_epoch_after_epoch(corpus: Corpus) -> None:
    tokens = _train_tokens(corpus)
    epoch_steps = (len(tokens) - 1) // SEQ // GLOBAL
    rows = torch.cat(_steps(_loaders(corpus, 1), epoch_steps + 3))
    stream = torch.tensor(tokens * 2)
    expected = torch.stack([stream[g * SEQ : g * SEQ + SEQ + 1] for g in range(len(rows))])
    assert torch.equal(rows, expected)  # concat-and-chunk, across files and into the second epoch


def test_stop_and_resume_twice_gives_the_uninterrupted_windows(corpus: Corpus) -> None:
    straight = _steps(_loaders(corpus, 1), 30)  # about one and a half epochs
    first = _loaders(corpus, 1)
    resumed = _steps(first, 7)
    second = _loaders(corpus, 1, first[0].state_dict())
    resumed += _steps(second, 12)
    third = _loaders(corpus, 1, second[0].state_dict())
    resumed += _steps(third, 11)
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight)) and len(resumed) == 30
    assert third[0].state_dict()["consumed_samples"] == 30 * GLOBAL
    assert third[0].state_dict()["position"]["epoch"] == 1


@pytest.mark.parametrize("until", ["batch", "epoch"])
def test_a_position_between_documents_resumes_there(corpus: Corpus, until: str) -> None:
    """With every document read so far used up (the end of a tokenized batch of documents, or of
    the source), the position is the reader's own."""
    cfg, tok = _cfg(corpus), load_tokenizer(corpus.tokenizer)
    stream = PackedStream(cfg, tok, "train", seq_len=1)
    if until == "batch":
        stream.fill()
        stream.skip(stream.buffered)
    else:
        stream.skip(len(_train_tokens(corpus)))
    assert not stream.buffer
    position = json.loads(json.dumps(stream.position()))
    assert position["epoch"] == 0 and position["source"]["row"] > 0
    expected = stream.windows(200)
    assert np.array_equal(PackedStream(cfg, tok, "train", 1, position).windows(200), expected)


def test_ranks_are_disjoint_and_resume_on_another_world_size(corpus: Corpus) -> None:
    straight = _steps(_loaders(corpus, 1), 9)
    four = _loaders(corpus, 4)
    for step in range(4):
        parts = [torch.cat(loader.next_batch()) for loader in four]
        assert torch.equal(torch.cat(parts), straight[step])  # rank r holds the r-th quarter
    states = [loader.state_dict() for loader in four]
    assert all(state == states[0] for state in states)  # every rank packs the whole global batch
    two = _loaders(corpus, 2, states[0])
    assert all(torch.equal(a, b) for a, b in zip(_steps(two, 5), straight[4:]))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_dataloader_workers_give_the_same_steps_and_state(corpus: Corpus) -> None:
    straight = _steps(_loaders(corpus, 2), 8)
    workers = _loaders(corpus, 2, num_workers=2)
    got = _steps(workers, 5)
    resumed = _loaders(corpus, 2, workers[1].state_dict())
    got += _steps(resumed, 3)
    assert all(torch.equal(a, b) for a, b in zip(got, straight)) and len(got) == 8


def test_a_stream_worker_tokenizes_on_threads_after_the_training_process_has(corpus: Corpus) -> None:
    # A forked worker would inherit a tokenizer thread pool the library then turns off (after the
    # validation windows used it here): one core for the whole stream.
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}  # the library's default
    result = run_module(
        "tests.data.stream_worker_probe", _overrides(corpus, "data.num_workers=1"), cwd=REPO, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    threads = json.loads(result.stdout.strip().splitlines()[-1])
    assert threads["parent_started_pool"] and threads["after"] > threads["before"], threads


def test_validation_holds_out_documents_by_the_hash_rule(corpus: Corpus) -> None:
    tok = load_tokenizer(corpus.tokenizer)
    held = [
        tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for row, text in enumerate(corpus.texts) if text.strip() and is_validation(str(row), 0.1)
    ]
    stream = torch.tensor(sum(held, []))
    batches = StreamData(_cfg(corpus)).validation_batches(batch_size=2, num_batches=3)
    rows = torch.cat(batches)
    assert [len(b) for b in batches] == [2, 2, 2]
    assert torch.equal(rows, torch.stack([stream[i * SEQ : i * SEQ + SEQ + 1] for i in range(6)]))


def test_a_state_for_other_data_is_refused_naming_both(corpus: Corpus, tmp_path: Path) -> None:
    loader = _loaders(corpus, 1)[0]
    loader.next_batch()
    state = loader.state_dict()
    data = StreamData(_cfg(corpus, "data.seq_len=8"))
    with pytest.raises(DataError, match=r"seq_len: saved 16, now 8"):
        data.loader(seed=0, global_batch=GLOBAL, micro_batch=2, dp_rank=0, dp_size=1).load_state_dict(state)

    other_tok = tmp_path / "tokenizer"
    train_bpe([t for t in corpus.texts if t], 280).save_pretrained(str(other_tok))
    data = StreamData(_cfg(corpus, f"data.tokenizer={other_tok}"))
    with pytest.raises(DataError, match=rf"tokenizer_hash: saved '{state['tokenizer_hash']}', now '{data.manifest['tokenizer_hash']}'"):
        data.loader(seed=0, global_batch=GLOBAL, micro_batch=2, dp_rank=0, dp_size=1).load_state_dict(state)

    data = StreamData(_cfg(corpus, f"data.data_files=[{corpus.files[0]}]"))
    with pytest.raises(DataError, match=r"source: saved .*b\.jsonl.*, now .*a\.jsonl'\]"):
        data.loader(seed=0, global_batch=GLOBAL, micro_batch=2, dp_rank=0, dp_size=1).load_state_dict(state)


def test_stream_mode_refuses_what_it_cannot_stream(corpus: Corpus) -> None:
    with pytest.raises(DataError, match="needs a finished tokenizer; found data.tokenizer='embedded'"):
        open_data(_cfg(corpus, "data.tokenizer=embedded"))
    with pytest.raises(DataError, match=r"data.mode='streaming': expected one of \['prepared', 'stream'\]"):
        open_data(_cfg(corpus, "data.mode=streaming"))
    only_held_out = _cfg(corpus, "data.validation_fraction=0.999999")
    with pytest.raises(DataError, match="has no train documents"):
        StreamData(only_held_out).loader(seed=0, global_batch=GLOBAL, micro_batch=2, dp_rank=0, dp_size=1).next_batch()


def _run_args(corpus: Corpus, run_dir: Path) -> list[str]:
    files = ",".join(str(f) for f in corpus.files)
    return [
        "experiment=smoke", "logging.wandb.mode=disabled", f"run.dir={run_dir}", "deepspeed=zero0",
        "train.precision=fp32", "eval.every=0", "logging.every=1", "train.steps=6", "checkpoint.every=3",
        "data.mode=stream", "data.source=json", f"data.data_files=[{files}]", f"data.tokenizer={corpus.tokenizer}",
        "data.validation_fraction=0.1",
    ]


def _ok(result) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_training_on_a_stream_resumes_with_the_same_losses(corpus: Corpus, tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _ok(run_module("zeroforge.trainer.train", _run_args(corpus, straight), cwd=REPO))
    _ok(run_module("zeroforge.trainer.train", [*_run_args(corpus, resumed), "train.exit_interval=3"], cwd=REPO))
    saved = json.loads((resumed / "checkpoints" / "step_0000003" / "manifest.json").read_text())["run"]["data"]
    assert saved["consumed_samples"] == 3 * 8 and saved["position"]["source"]["row"] > 0
    output = _ok(run_module("zeroforge.trainer.train", _run_args(corpus, resumed), cwd=REPO))
    assert "resumed from" in output
    assert len(train_losses(straight)) == 6
    assert train_losses(resumed) == train_losses(straight)
    assert [r["step"] for r in read_metrics(resumed) if "loss" in r] == list(range(1, 7))


@pytest.mark.slow
def test_a_streamed_runs_checkpoint_evaluates_like_the_trainer(corpus: Corpus, tmp_path: Path) -> None:
    """A streamed run has no prepared data: its checkpoint's tokenizer is data.tokenizer, and its
    validation windows come from the source's held-out documents."""
    run_dir = tmp_path / "run"
    args = [*_run_args(corpus, run_dir), "eval.every=6"]
    _ok(run_module("zeroforge.trainer.train", args, cwd=REPO))
    trained = [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r]
    output = _ok(run_module("zeroforge.trainer.evaluate", [*args, f"eval.model_path={run_dir / 'checkpoints'}"], cwd=REPO))
    assert f"held-out loss {trained[-1]:.4f}" in output
