"""Streaming mode: partitions packed on the fly, the same global batches on every world size, after
any stops, ranks and workers."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import REPO, TORCHRUN, read_metrics, run_module, train_losses
from zeroforge.data.build import open_data
from zeroforge.data.corpus import is_validation
from zeroforge.data.errors import DataError
from zeroforge.data.partitions import document_partition
from zeroforge.data.stream import StreamData, StreamLoader
from zeroforge.data.tokenizer import load_tokenizer, train_bpe
from zeroforge.trainer.checkpoint import check_resumable
from zeroforge.trainer.config import ConfigError, compose_config
from zeroforge.trainer.validate import validate

SEQ = 16
GLOBAL = 8
PARTITIONS = 4
FILES = 8
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


@dataclass
class Corpus:
    files: list[Path]  # FILES jsonl files: partitioned by shard
    texts: list[list[str]]  # every file's rows, in order (empty ones included)
    single: Path  # the same rows in one file: partitioned by document
    tokenizer: Path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    """Short and long documents (some longer than a window, some empty) in FILES jsonl files and
    in one, and a small BPE trained on them."""
    root = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)
    texts = [[" ".join(rng.choice(WORDS, size=int(rng.integers(1, 40)))) for _ in range(25)] for _ in range(FILES)]
    texts[1][7] = texts[6][0] = ""
    files = [root / f"part-{i}.jsonl" for i in range(FILES)]
    for path, rows in zip(files, texts):
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    single = root / "single.jsonl"
    single.write_text("".join(f.read_text() for f in files))
    train_bpe([t for rows in texts for t in rows if t], 300).save_pretrained(str(root / "tokenizer"))
    return Corpus(files, texts, single, root / "tokenizer")


def _overrides(corpus: Corpus, *extra: str, layout: str = "shards") -> list[str]:
    files = ",".join(str(f) for f in corpus.files) if layout == "shards" else str(corpus.single)
    return [
        "data.mode=stream",
        "data.source=json",
        f"data.data_files=[{files}]",
        f"data.tokenizer={corpus.tokenizer}",
        f"data.seq_len={SEQ}",
        "data.validation_fraction=0.1",
        f"data.stream_partitions={PARTITIONS}",
        *extra,
    ]


def _cfg(corpus: Corpus, *overrides: str, layout: str = "shards"):
    return compose_config(_overrides(corpus, *overrides, layout=layout)).data


def _loaders(
    corpus: Corpus,
    dp_size: int,
    state: Optional[dict] = None,
    *overrides: str,
    layout: str = "shards",
    global_batch: int = GLOBAL,
    micro_batch: int = 2,
) -> list[StreamLoader]:
    """The loaders of every rank of a world of dp_size (data/ needs no process group)."""
    data = StreamData(_cfg(corpus, *overrides, layout=layout))
    loaders = [data.loader(seed=0, global_batch=global_batch, micro_batch=micro_batch, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint manifest holds it
    return loaders


def _steps(loaders: list[StreamLoader], steps: int) -> list[torch.Tensor]:
    """Each global batch's rows in sample order: sample g of a batch is on rank g mod dp."""
    batches = []
    for _ in range(steps):
        parts = [torch.cat(loader.next_batch()) for loader in loaders]
        whole = torch.empty((loaders[0].global_batch, SEQ + 1), dtype=torch.int64)
        for rank, part in enumerate(parts):
            whole[rank :: len(loaders)] = part
        batches.append(whole)
    return batches


def _state(loaders: list[StreamLoader]) -> dict:
    """The job's state, as the trainer's checkpoint gathers it."""
    return StreamLoader.global_state([loader.state_dict() for loader in loaders])


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _encode(corpus: Corpus, texts: list[str]) -> list[int]:
    tok = load_tokenizer(corpus.tokenizer)
    return [t for text in texts for t in tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]


def _partition_texts(corpus: Corpus, layout: str) -> list[list[str]]:
    """One epoch of each partition's train documents, built directly from the rules."""
    parts: list[list[str]] = [[] for _ in range(PARTITIONS)]
    if layout == "shards":  # partition p: files p, p + P, ...; keys "<file>:<row>"
        for p in range(PARTITIONS):
            for shard in range(p, FILES, PARTITIONS):
                parts[p] += [t for row, t in enumerate(corpus.texts[shard]) if t.strip() and not is_validation(f"{shard}:{row}", 0.1)]
    else:  # one file: keys are row numbers, a document's partition their hash
        rows = [t for texts in corpus.texts for t in texts]
        for row, t in enumerate(rows):
            if t.strip() and not is_validation(str(row), 0.1):
                parts[document_partition(str(row), PARTITIONS)].append(t)
    return parts


def _streams(corpus: Corpus, layout: str, shuffle: int = 0, seed: int = 0, epochs: int = 3) -> list[torch.Tensor]:
    """Each partition's token stream over `epochs` epochs, with the shuffle's blocks permuted."""
    streams = []
    for p, texts in enumerate(_partition_texts(corpus, layout)):
        tokens: list[int] = []
        for epoch in range(epochs):
            order = list(range(len(texts)))
            if shuffle:
                order = []
                for block, first in enumerate(range(0, len(texts), shuffle)):
                    size = min(shuffle, len(texts) - first)
                    rng = np.random.Generator(np.random.PCG64([seed, p, epoch, block]))
                    order += [first + i for i in rng.permutation(size).tolist()]
            tokens += _encode(corpus, [texts[i] for i in order])
        streams.append(torch.tensor(tokens))
    return streams


@pytest.mark.parametrize("layout,shuffle", [("shards", 0), ("document", 0), ("shards", 4)])
def test_sample_g_is_window_g_div_p_of_partition_g_mod_p_epoch_after_epoch(corpus: Corpus, layout: str, shuffle: int) -> None:
    streams = _streams(corpus, layout, shuffle)
    shortest = min(len(s) for s in streams) // 3
    steps = (shortest // SEQ) * PARTITIONS // GLOBAL + 3  # every partition into its second epoch
    rows = torch.cat(_steps(_loaders(corpus, 1, None, f"data.stream_shuffle_window={shuffle}", layout=layout), steps))
    expected = torch.stack([streams[g % PARTITIONS][(g // PARTITIONS) * SEQ :][: SEQ + 1] for g in range(len(rows))])
    assert torch.equal(rows, expected)


def test_a_global_batch_that_is_no_multiple_of_the_partitions_keeps_the_order_and_resumes(corpus: Corpus) -> None:
    # G=6 with P=4: each batch takes two windows from some partitions and one from the others.
    streams = _streams(corpus, "shards")
    straight = _steps(_loaders(corpus, 1, global_batch=6, micro_batch=1), 8)
    expected = torch.stack([streams[g % PARTITIONS][(g // PARTITIONS) * SEQ :][: SEQ + 1] for g in range(8 * 6)])
    assert torch.equal(torch.cat(straight), expected)
    two = _loaders(corpus, 2, global_batch=6, micro_batch=1)
    assert _same(_steps(two, 3), straight[:3])  # batch 3 starts at sample 18: partition 2's turn
    assert _same(_steps(_loaders(corpus, 1, _state(two), global_batch=6, micro_batch=1), 5), straight[3:])


def test_the_shuffle_depends_on_the_seed(corpus: Corpus) -> None:
    def batches(seed: int) -> torch.Tensor:
        data = StreamData(_cfg(corpus, "data.stream_shuffle_window=4"))
        return torch.cat(_steps([data.loader(seed=seed, global_batch=GLOBAL, micro_batch=2, dp_rank=0, dp_size=1)], 4))

    assert torch.equal(batches(0), batches(0)) and not torch.equal(batches(0), batches(1))


@pytest.mark.parametrize("layout", ["shards", "document"])
def test_global_batches_are_the_same_on_1_2_and_4_ranks_and_resume_on_another(corpus: Corpus, layout: str) -> None:
    one = _loaders(corpus, 1, layout=layout)
    straight = _steps(one, 8)
    two, four = _loaders(corpus, 2, layout=layout), _loaders(corpus, 4, layout=layout)
    assert _same(_steps(two, 4), straight[:4]) and _same(_steps(four, 4), straight[:4])
    # Step 4's state of each world size, resumed on the others.
    for saved in (two, four):
        state = _state(saved)
        assert state["consumed_samples"] == 4 * GLOBAL and all(p is not None for p in state["positions"])
        for dp in (1, 2, 4):
            assert _same(_steps(_loaders(corpus, dp, state, layout=layout), 4), straight[4:]), (len(saved), dp)


def test_two_gloo_ranks_give_the_same_global_batches_and_their_state_resumes_on_1_and_4(corpus: Corpus, tmp_path: Path) -> None:
    out = tmp_path / "ranks.json"
    result = run_module(
        "tests.data.stream_ranks_probe", [str(out), "8", "4", *_overrides(corpus)], cwd=REPO, launcher=TORCHRUN, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = json.loads(out.read_text())
    straight = _steps(_loaders(corpus, 1), 8)
    assert _same([torch.tensor(b) for b in ranks["batches"]], straight)
    for dp in (1, 4):
        assert _same(_steps(_loaders(corpus, dp, ranks["state"]), 4), straight[4:])


@pytest.mark.parametrize("shuffle", [0, 5])
def test_stop_and_resume_twice_gives_the_uninterrupted_windows(corpus: Corpus, shuffle: int) -> None:
    window = f"data.stream_shuffle_window={shuffle}"
    longest = max(len(s) for s in _streams(corpus, "shards", epochs=1))
    steps = longest // SEQ * PARTITIONS // GLOBAL + 7  # every partition into its second epoch
    straight = _steps(_loaders(corpus, 1, None, window), steps)
    first = _loaders(corpus, 2, None, window)
    resumed = _steps(first, 7)
    second = _loaders(corpus, 1, _state(first), window)
    resumed += _steps(second, steps // 2)
    third = _loaders(corpus, 4, _state(second), window)
    resumed += _steps(third, steps - 7 - steps // 2)
    assert _same(resumed, straight)
    state = _state(third)
    assert state["consumed_samples"] == steps * GLOBAL and min(p["epoch"] for p in state["positions"]) == 1


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_dataloader_workers_split_the_partitions_and_give_the_same_steps_and_state(corpus: Corpus) -> None:
    straight = _steps(_loaders(corpus, 1), 8)
    before = _loaders(corpus, 2)
    got = _steps(before, 3)
    workers = _loaders(corpus, 1, _state(before), "data.num_workers=2")  # two partitions a worker
    got += _steps(workers, 3)
    after = _loaders(corpus, 4, _state(workers))
    got += _steps(after, 2)
    assert _same(got, straight)


def test_a_stream_worker_tokenizes_on_threads_after_the_training_process_has(corpus: Corpus) -> None:
    # A forked worker would inherit a tokenizer thread pool the library then turns off (after the
    # validation windows used it here): one core for the whole stream.
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}  # the library's default
    result = run_module("tests.data.stream_worker_probe", _overrides(corpus, "data.num_workers=1"), cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    threads = json.loads(result.stdout.strip().splitlines()[-1])
    assert threads["parent_started_pool"] and threads["after"] > threads["before"], threads


@pytest.mark.parametrize("layout", ["shards", "document"])
def test_validation_holds_out_documents_by_the_hash_of_the_training_keys(corpus: Corpus, layout: str) -> None:
    if layout == "shards":
        held = [
            t for shard, rows in enumerate(corpus.texts) for row, t in enumerate(rows) if t.strip() and is_validation(f"{shard}:{row}", 0.1)
        ]
    else:
        rows = [t for texts in corpus.texts for t in texts]
        held = [t for row, t in enumerate(rows) if t.strip() and is_validation(str(row), 0.1)]
    stream = torch.tensor(_encode(corpus, held))
    batches = StreamData(_cfg(corpus, layout=layout)).validation_batches(batch_size=2, num_batches=3)
    rows = torch.cat(batches)
    assert [len(b) for b in batches] == [2, 2, 2]
    assert torch.equal(rows, torch.stack([stream[i * SEQ : i * SEQ + SEQ + 1] for i in range(6)]))


def test_a_source_with_fewer_shards_than_partitions_is_refused_naming_both(corpus: Corpus) -> None:
    with pytest.raises(DataError, match=r"has 8 shards \(files\), fewer than data.stream_partitions=16.*at most 8"):
        StreamData(_cfg(corpus, "data.stream_partitions=16"))
    StreamData(_cfg(corpus, "data.stream_partitions=16", layout="document"))  # one file: by document


def test_a_partition_count_the_world_size_does_not_divide_is_refused_naming_both(corpus: Corpus) -> None:
    data = StreamData(_cfg(corpus))
    with pytest.raises(DataError, match=r"data.stream_partitions=4 must be a multiple of the data-parallel size 3"):
        data.loader(seed=0, global_batch=6, micro_batch=2, dp_rank=0, dp_size=3)
    with pytest.raises(DataError, match=r"data.num_workers=3: a rank's workers split its 2 partitions .*at most 2"):
        StreamData(_cfg(corpus, "data.num_workers=3")).loader(seed=0, global_batch=GLOBAL, micro_batch=2, dp_rank=0, dp_size=2)
    # Before any job starts: validate() names the same numbers.
    cfg = compose_config(["train.micro_batch_size=2", "train.global_batch_size=12", *_overrides(corpus)])
    with pytest.raises(ConfigError, match=r"data.stream_partitions=4 must be a multiple of the data-parallel size 3"):
        validate(cfg, world_size=3, cuda=False)
    validate(cfg, world_size=2, cuda=False)


def test_a_state_from_another_partition_count_or_one_rank_alone_is_refused(corpus: Corpus, tmp_path: Path) -> None:
    four = _loaders(corpus, 2)
    _steps(four, 1)
    state = _state(four)
    # The trainer refuses such a checkpoint before it builds the model, naming both numbers.
    data = StreamData(_cfg(corpus))
    (tmp_path / "manifest.json").write_text(
        json.dumps(
            {
                "run": {
                    "data": state,
                    "tokenizer_hash": data.manifest["tokenizer_hash"],
                    "world_size": 2,
                    "model": OmegaConf.to_container(compose_config([]).model, resolve=True),
                }
            }
        )
    )
    cfg = compose_config(_overrides(corpus, "data.stream_partitions=8", "data.stream_shuffle_window=2"))
    with pytest.raises(ConfigError, match=r"data.stream_partitions: checkpoint 4, now 8; data.stream_shuffle_window: checkpoint 0, now 2"):
        check_resumable(
            tmp_path, model=cfg.model, data=cfg.data, seed=cfg.seed, deepspeed=cfg.deepspeed, data_manifest=data.manifest, world_size=2
        )
    other = StreamData(_cfg(corpus, "data.stream_partitions=8")).loader(seed=0, global_batch=GLOBAL, micro_batch=2, dp_rank=0, dp_size=1)
    with pytest.raises(DataError, match=r"data.stream_partitions: saved 4, now 8"):
        other.load_state_dict(state)
    shuffled = StreamData(_cfg(corpus, "data.stream_shuffle_window=3")).loader(
        seed=0, global_batch=GLOBAL, micro_batch=2, dp_rank=0, dp_size=1
    )
    with pytest.raises(DataError, match=r"data.stream_shuffle_window: saved 0, now 3"):
        shuffled.load_state_dict(state)
    with pytest.raises(DataError, match=r"no position for partition\(s\) \[1, 3\] of rank 0: it is one rank's state_dict"):
        _loaders(corpus, 1, four[0].state_dict())


def test_a_state_for_other_data_is_refused_naming_both(corpus: Corpus, tmp_path: Path) -> None:
    loader = _loaders(corpus, 1)[0]
    loader.next_batch()
    state = loader.state_dict()
    data = StreamData(_cfg(corpus, "data.seq_len=8"))
    with pytest.raises(DataError, match=r"seq_len: saved 16, now 8"):
        data.loader(seed=0, global_batch=GLOBAL, micro_batch=2, dp_rank=0, dp_size=1).load_state_dict(state)

    other_tok = tmp_path / "tokenizer"
    train_bpe([t for rows in corpus.texts for t in rows if t], 280).save_pretrained(str(other_tok))
    data = StreamData(_cfg(corpus, f"data.tokenizer={other_tok}"))
    with pytest.raises(DataError, match=rf"tokenizer_hash: saved '{state['tokenizer_hash']}', now '{data.manifest['tokenizer_hash']}'"):
        data.loader(seed=0, global_batch=GLOBAL, micro_batch=2, dp_rank=0, dp_size=1).load_state_dict(state)

    data = StreamData(_cfg(corpus, layout="document"))
    with pytest.raises(DataError, match=r"source: saved .*part-7\.jsonl.*, now .*single\.jsonl'\]"):
        data.loader(seed=0, global_batch=GLOBAL, micro_batch=2, dp_rank=0, dp_size=1).load_state_dict(state)


def test_stream_mode_refuses_what_it_cannot_stream(corpus: Corpus) -> None:
    with pytest.raises(DataError, match="needs a finished tokenizer; found data.tokenizer='embedded'"):
        open_data(_cfg(corpus, "data.tokenizer=embedded"))
    with pytest.raises(DataError, match=r"data.mode='streaming': expected one of \['prepared', 'stream'\]"):
        open_data(_cfg(corpus, "data.mode=streaming"))
    with pytest.raises(DataError, match=r"data.max_documents=10 with data.mode=stream: .* has 8 shards"):
        StreamData(_cfg(corpus, "data.max_documents=10"))
    only_held_out = _cfg(corpus, "data.validation_fraction=0.999999")
    with pytest.raises(DataError, match=r"partition 0 of data.stream_partitions=4 \(shards \[0, 4\]\) has no train documents"):
        StreamData(only_held_out).loader(seed=0, global_batch=GLOBAL, micro_batch=2, dp_rank=0, dp_size=1).next_batch()


def test_a_data_error_in_a_dataloader_worker_keeps_its_own_message(corpus: Corpus) -> None:
    # torch would re-raise it wrapped in the worker's traceback, which would reach the user.
    only_held_out = _cfg(corpus, "data.validation_fraction=0.999999", "data.num_workers=1")
    loader = StreamData(only_held_out).loader(seed=0, global_batch=GLOBAL, micro_batch=2, dp_rank=0, dp_size=1)
    with pytest.raises(DataError) as err:
        loader.next_batch()
    assert str(err.value).startswith("data source ") and "has no train documents" in str(err.value)
    assert "Traceback" not in str(err.value) and "DataLoader worker" not in str(err.value)


def test_max_documents_counts_the_first_documents_of_a_one_file_source(corpus: Corpus) -> None:
    capped = torch.cat(_steps(_loaders(corpus, 1, None, "data.max_documents=40", layout="document"), 6))
    first = [t for texts in corpus.texts for t in texts]
    rows, kept = [], 0
    for row, t in enumerate(first):
        if t.strip():
            kept += 1
            if kept > 40:
                break
        rows.append(row)
    parts: list[list[str]] = [[] for _ in range(PARTITIONS)]
    for row in rows:
        t = first[row]
        if t.strip() and not is_validation(str(row), 0.1):
            parts[document_partition(str(row), PARTITIONS)].append(t)
    streams = [torch.tensor(_encode(corpus, texts) * 10) for texts in parts]
    expected = torch.stack([streams[g % PARTITIONS][(g // PARTITIONS) * SEQ :][: SEQ + 1] for g in range(len(capped))])
    assert torch.equal(capped, expected)


def _run_args(corpus: Corpus, run_dir: Path) -> list[str]:
    files = ",".join(str(f) for f in corpus.files)
    return [
        "experiment=smoke",
        "logging.wandb.mode=disabled",
        f"run.dir={run_dir}",
        "deepspeed=zero0",
        "train.precision=fp32",
        "eval.every=0",
        "logging.every=1",
        "train.steps=6",
        "optim.warmup_steps=2",
        "checkpoint.every=3",
        "data.mode=stream",
        "data.source=json",
        f"data.data_files=[{files}]",
        f"data.tokenizer={corpus.tokenizer}",
        "data.validation_fraction=0.1",
        f"data.stream_partitions={PARTITIONS}",
    ]


def _ok(result) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_training_on_a_stream_resumes_on_another_world_size_with_the_same_losses(corpus: Corpus, tmp_path: Path) -> None:
    """Two gloo ranks train 3 steps and save (each rank's partitions gathered into the checkpoint);
    one process resumes: the losses are one process's all the way."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _ok(run_module("zeroforge.trainer.train", _run_args(corpus, straight), cwd=REPO))
    _ok(run_module("zeroforge.trainer.train", [*_run_args(corpus, resumed), "train.exit_interval=3"], cwd=REPO, launcher=TORCHRUN))
    saved = json.loads((resumed / "checkpoints" / "step_0000003" / "manifest.json").read_text())["run"]["data"]
    assert saved["consumed_samples"] == 3 * 8 and saved["partitions"] == PARTITIONS
    assert all(p["place"] is not None for p in saved["positions"])  # both ranks' partitions, all moved on
    output = _ok(run_module("zeroforge.trainer.train", _run_args(corpus, resumed), cwd=REPO))
    assert "resumed from" in output
    assert len(train_losses(straight)) == 6
    assert train_losses(resumed) == pytest.approx(train_losses(straight), rel=1e-5)
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
