"""Preparing corpora into shards: the embedded default, local files, and the errors a user can cause."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from tests.conftest import REPO, run_module
from zeroforge.data.build import open_data, prepared_manifest
from zeroforge.data.corpus import embedded_files, is_validation
from zeroforge.data.errors import DataError
from zeroforge.data.prepare import prepare, prepared_dir
from zeroforge.data.shards import TokenStore, load_manifest
from zeroforge.trainer.config import compose_config


def _data_cfg(*overrides: str):
    return compose_config(list(overrides)).data


def test_embedded_corpus_prepares_into_manifest_and_shards(data_cache: Path) -> None:
    cfg = _data_cfg(f"data.cache_dir={data_cache}")
    out = prepare(cfg)
    assert out == prepared_dir(cfg)
    manifest = load_manifest(out)
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == cfg.tokenizer_vocab_size
    train, val = manifest["splits"]["train"], manifest["splits"]["validation"]
    assert train["tokens"] > 1_000_000 and val["tokens"] > 10_000
    # Split by file: every non-empty file is a document of exactly one split.
    non_empty = [p for p in embedded_files() if p.read_text(encoding="utf-8", errors="replace").strip()]
    assert train["documents"] + val["documents"] == len(non_empty)
    for split in ("train", "validation"):
        for shard in manifest["splits"][split]["shards"]:
            assert (out / shard["file"]).stat().st_size == shard["tokens"] * 2
    tokens = TokenStore(out, "train").read(0, 100_000)
    assert tokens.max() < manifest["vocab_size"]
    # Every document ends with EOS.
    assert (np.asarray(TokenStore(out, "train").read(0, len(TokenStore(out, "train")))) == manifest["eos_id"]).sum() == train["documents"]


def test_embedded_tokenizer_loads_with_autotokenizer_and_round_trips(data_cache: Path) -> None:
    out = prepare(_data_cfg(f"data.cache_dir={data_cache}"))
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    text = "def f(x):\n    return x + 1  # é\n"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token == "<|endoftext|>"


def test_prepare_is_cached_by_fingerprint(data_cache: Path) -> None:
    cfg = _data_cfg(f"data.cache_dir={data_cache}")
    out = prepare(cfg)
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert prepare(cfg) == out
    assert (out / "manifest.json").stat().st_mtime_ns == mtime
    assert prepared_dir(_data_cfg(f"data.cache_dir={data_cache}", "data.tokenizer_vocab_size=512")) != out


def test_validation_split_is_a_pure_function_of_the_key() -> None:
    keys = [f"doc-{i}" for i in range(10_000)]
    held = [k for k in keys if is_validation(k, 0.1)]
    assert 800 < len(held) < 1200
    # The same in another interpreter with another string-hash seed: no dependence on hash().
    code = (
        "from zeroforge.data.corpus import is_validation; print([k for k in (f'doc-{i}' for i in range(10000)) if is_validation(k, 0.1)])"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "12345"}, check=True
    )
    assert other.stdout.strip() == str(held)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_local_jsonl_with_an_autotokenizer(tmp_path: Path, data_cache: Path) -> None:
    tokenizer_dir = prepare(_data_cfg(f"data.cache_dir={data_cache}")) / "tokenizer"
    rows = [{"content": f"def function_{i}(a, b):\n    return a * {i} + b\n"} for i in range(200)]
    _write_jsonl(tmp_path / "docs.jsonl", rows)
    cfg = _data_cfg(
        "data.name=local",
        "data.source=json",
        f"data.data_files=[{tmp_path}/*.jsonl]",
        "data.text_field=content",
        f"data.tokenizer={tokenizer_dir}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.validation_fraction=0.2",
        "data.shard_tokens=500",
    )
    out = prepare(cfg)
    manifest = load_manifest(out)
    splits = manifest["splits"]
    assert splits["train"]["documents"] + splits["validation"]["documents"] == 200
    assert len(splits["train"]["shards"]) > 1
    # Reads across shard boundaries equal the concatenated shards.
    store = TokenStore(out, "train")
    whole = np.concatenate([np.fromfile(out / s["file"], dtype=np.uint16) for s in splits["train"]["shards"]])
    assert np.array_equal(store.read(450, 200), whole[450:650])
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert manifest["tokenizer_hash"] and manifest["vocab_size"] == len(tok)


def test_missing_files_are_named(tmp_path: Path) -> None:
    cfg = _data_cfg("data.source=json", f"data.data_files=[{tmp_path}/nothing/*.jsonl]", f"data.cache_dir={tmp_path}")
    with pytest.raises(DataError, match=r"no file matches .*nothing/\*\.jsonl"):
        prepare(cfg)


def test_empty_source_is_refused(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "empty.jsonl", [{"text": "   "}, {"text": ""}])
    cfg = _data_cfg("data.source=json", f"data.data_files=[{tmp_path}/empty.jsonl]", f"data.cache_dir={tmp_path}/c")
    with pytest.raises(DataError, match=r"'json' with data_files .*empty\.jsonl.* yielded no documents.*field 'text'"):
        prepare(cfg)
    assert not list((tmp_path / "c").glob("*/manifest.json"))


def test_missing_field_and_non_text_values_are_named(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "a.jsonl", [{"body": "x"}])
    cfg = _data_cfg("data.source=json", f"data.data_files=[{tmp_path}/a.jsonl]", f"data.cache_dir={tmp_path}/c")
    with pytest.raises(DataError, match=r"a\.jsonl.*no field 'text' .*\['body'\]"):
        prepare(cfg)
    _write_jsonl(tmp_path / "b.jsonl", [{"text": 3}])
    cfg = _data_cfg("data.source=json", f"data.data_files=[{tmp_path}/b.jsonl]", f"data.cache_dir={tmp_path}/c")
    with pytest.raises(DataError, match=r"b\.jsonl.*field 'text' .* is int, expected text"):
        prepare(cfg)


def test_truncated_shard_is_detected(tmp_path: Path, data_cache: Path) -> None:
    tokenizer_dir = prepare(_data_cfg(f"data.cache_dir={data_cache}")) / "tokenizer"
    (tmp_path / "t.txt").write_text("\n".join(f"line {i} of text" for i in range(300)))
    cfg = _data_cfg(
        "data.source=text",
        f"data.data_files=[{tmp_path}/t.txt]",
        f"data.tokenizer={tokenizer_dir}",
        f"data.cache_dir={tmp_path}/c",
        "data.validation_fraction=0.3",
    )
    out = prepare(cfg)
    shard = out / load_manifest(out)["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=str(shard)):
        TokenStore(out, "train")


def test_file_builder_without_files_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="expected data.data_files, found none"):
        prepare(_data_cfg("data.source=json", f"data.cache_dir={tmp_path}"))


def test_unknown_hub_dataset_is_named(tmp_path: Path) -> None:
    cfg = _data_cfg("data.source=no-such-org/no-such-dataset", f"data.cache_dir={tmp_path}")
    with pytest.raises(DataError, match="'no-such-org/no-such-dataset' could not be opened"):
        prepare(cfg)
    assert not list(tmp_path.iterdir()), "a failed prepare left files behind"


def test_unknown_tokenizer_is_named(tmp_path: Path) -> None:
    cfg = _data_cfg(f"data.tokenizer={tmp_path}/no-tokenizer", f"data.cache_dir={tmp_path}/c")
    with pytest.raises(DataError, match="no-tokenizer' could not be loaded"):
        prepare(cfg)


def _docs_cfg(tmp_path: Path, data_cache: Path, cache: str, *overrides: str):
    """300 jsonl documents of varied length, shards of about 400 tokens, the embedded tokenizer."""
    return _data_cfg(*_docs_overrides(tmp_path, data_cache, cache, *overrides))


def _docs_overrides(tmp_path: Path, data_cache: Path, cache: str, *overrides: str) -> list[str]:
    """_docs_cfg's overrides, as a command line gives them."""
    if not (tmp_path / "docs.jsonl").exists():
        rows = [{"text": f"doc {i}: " + " ".join(f"word{j * i % 97}" for j in range(i % 40 + 1))} for i in range(300)]
        _write_jsonl(tmp_path / "docs.jsonl", rows)
    tokenizer_dir = prepare(_data_cfg(f"data.cache_dir={data_cache}")) / "tokenizer"
    return [
        "data.name=docs",
        "data.source=json",
        f"data.data_files=[{tmp_path}/docs.jsonl]",
        f"data.tokenizer={tokenizer_dir}",
        f"data.cache_dir={tmp_path / cache}",
        "data.shard_tokens=400",
        "data.validation_fraction=0.2",
        *overrides,
    ]


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_output_is_the_same_for_any_number_of_workers(tmp_path: Path, data_cache: Path) -> None:
    one = prepare(_docs_cfg(tmp_path, data_cache, "one", "data.prepare_workers=1"))
    three = prepare(_docs_cfg(tmp_path, data_cache, "three", "data.prepare_workers=3"))
    assert len(load_manifest(one)["splits"]["train"]["shards"]) > 5
    assert _files(one) == _files(three)


def test_workers_never_run_the_callers_main_module(tmp_path: Path, data_cache: Path) -> None:
    """A spawned worker would import the caller's script first: the trainer's torch and DeepSpeed
    in every worker, and a script without a __main__ guard run again (its workers failing)."""
    cfg = _docs_cfg(tmp_path, data_cache, "script", "data.prepare_workers=2")
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from pathlib import Path\n"
        "from omegaconf import OmegaConf\n"
        "from zeroforge.data.prepare import prepare\n"
        f"with open({str(tmp_path / 'runs')!r}, 'a') as f:\n"
        "    f.write('ran\\n')\n"
        f"print(prepare(OmegaConf.create({OmegaConf.to_yaml(cfg)!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs").read_text() == "ran\n"
    assert _files(Path(done.stdout.strip())) == _files(prepare(_docs_cfg(tmp_path, data_cache, "one", "data.prepare_workers=1")))


def test_each_shard_has_a_document_offset_index(tmp_path: Path, data_cache: Path) -> None:
    out = prepare(_docs_cfg(tmp_path, data_cache, "c", "data.prepare_workers=2"))
    manifest = load_manifest(out)
    documents = 0
    for shard in manifest["splits"]["train"]["shards"]:
        tokens = np.fromfile(out / shard["file"], dtype=np.uint16)
        offsets = np.fromfile(out / shard["index"], dtype=np.uint64).astype(np.int64)
        assert len(offsets) == shard["documents"] + 1 and offsets[0] == 0 and offsets[-1] == len(tokens)
        # Every document ends with EOS, and nowhere else.
        assert np.array_equal(np.flatnonzero(tokens == manifest["eos_id"]), offsets[1:] - 1)
        documents += shard["documents"]
    assert documents == manifest["splits"]["train"]["documents"]
    assert manifest["bos_id"] is None and manifest["source_fingerprint"]


def test_interrupted_prepare_resumes_after_its_last_complete_shard(
    tmp_path: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zeroforge.data.encode
    import zeroforge.data.prepare

    reference = prepare(_docs_cfg(tmp_path, data_cache, "reference", "data.prepare_workers=1"))
    cfg = _docs_cfg(tmp_path, data_cache, "interrupted", "data.prepare_workers=2")
    real_documents = zeroforge.data.prepare.iter_documents

    def stops_after_200(cfg):
        for i, doc in enumerate(real_documents(cfg)):
            if i == 200:
                raise KeyboardInterrupt  # as if the job were killed here
            yield doc

    monkeypatch.setattr(zeroforge.data.prepare, "iter_documents", stops_after_200)
    monkeypatch.setattr(zeroforge.data.prepare, "_BATCH_DOCUMENTS", 16)  # shards complete before the stop
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    partial = prepared_dir(cfg).with_name(prepared_dir(cfg).name + ".partial")
    recorded = json.loads((partial / "progress.json").read_text())
    assert len(recorded["train"]["shards"]) >= 3 and not (partial / "manifest.json").exists()
    (partial / "train_00099.bin.tmp").write_bytes(b"half a shard")  # a write cut off by the kill

    monkeypatch.setattr(zeroforge.data.prepare, "iter_documents", real_documents)
    encoded: list[int] = []
    real_call = zeroforge.data.encode.DocumentEncoder.__call__
    monkeypatch.setattr(
        zeroforge.data.encode.DocumentEncoder, "__call__", lambda self, texts: encoded.append(len(texts)) or real_call(self, texts)
    )
    resumed = prepare(_docs_cfg(tmp_path, data_cache, "interrupted", "data.prepare_workers=1"))
    # Only the documents after the last recorded shard of their split were tokenized again.
    split_of = {i: "validation" if is_validation(str(i), 0.2) else "train" for i in range(300)}
    assert sum(encoded) == sum(1 for i in range(300) if i >= recorded[split_of[i]]["resume_at"]) < 250
    assert _files(resumed) == _files(reference)
    assert not partial.exists()


def test_a_prepared_directory_without_its_manifest_is_refused_until_moved_aside(tmp_path: Path, data_cache: Path) -> None:
    """The reported case: manifest.json deleted from a prepared directory, then `zeroforge prepare`
    again. It used to build a second copy and die renaming it onto the first (OSError, Errno 39)."""
    overrides = _docs_overrides(tmp_path, data_cache, "c", "data.prepare_workers=1")
    cfg = _data_cfg(*overrides)
    out = prepare(cfg)
    reference = _files(out)
    (out / "manifest.json").unlink()
    damaged = _files(out)

    result = run_module("zeroforge.launcher.prepare", overrides, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"zeroforge: data error: {out} has no manifest.json" in result.stderr, result.stderr
    assert f"mv {out} {out}.damaged" in result.stderr
    # Refused before any work: nothing written into it, and no second copy begun beside it.
    assert _files(out) == damaged and not out.with_name(out.name + ".partial").exists()
    with pytest.raises(DataError, match="has no manifest.json"):
        prepared_manifest(cfg)  # what a Slurm submission checks before queueing

    aside = out.rename(out.with_name(out.name + ".damaged"))  # as the message says
    assert prepare(cfg) == out and _files(out) == reference
    assert _files(aside) == damaged


def test_a_finished_build_stopped_before_its_rename_is_committed_as_it_is(
    tmp_path: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zeroforge.data.prepare

    cfg = _docs_cfg(tmp_path, data_cache, "c", "data.prepare_workers=1")
    out = prepare(cfg)
    reference = _files(out)
    out.rename(out.with_name(out.name + ".partial"))  # manifest written, then killed

    def build_again(cfg, build):
        raise AssertionError(f"{build} holds a finished build and was prepared again")

    monkeypatch.setattr(zeroforge.data.prepare, "_build", build_again)
    assert prepare(cfg) == out and _files(out) == reference
    assert not out.with_name(out.name + ".partial").exists()


def test_a_missing_shard_stops_prepare_and_the_start_of_training(tmp_path: Path, data_cache: Path) -> None:
    overrides = _docs_overrides(tmp_path, data_cache, "c", "data.prepare_workers=1")
    cfg = _data_cfg(*overrides)
    out = prepare(cfg)
    shard = out / load_manifest(out)["splits"]["validation"]["shards"][-1]["file"]
    shard.unlink()
    expected = (
        re.escape(f"shard {shard}: expected ")
        + r"\d+ bytes \(\d+ tokens\)"
        + re.escape(f" as the manifest says, found no file: {out} is damaged")
    )
    with pytest.raises(DataError, match=expected):
        open_data(cfg)  # what the launcher's pre-flight and the trainer open first, before the model
    result = run_module("zeroforge.launcher.prepare", overrides, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.search(expected, result.stderr), result.stderr


def test_bos_and_eos_frame_each_document_where_the_tokenizer_uses_bos(data_cache: Path) -> None:
    from tokenizers.processors import TemplateProcessing

    from zeroforge.data.encode import DocumentEncoder

    tok = AutoTokenizer.from_pretrained(str(prepare(_data_cfg(f"data.cache_dir={data_cache}")) / "tokenizer"))
    tok.add_special_tokens({"bos_token": "<s>"})
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    tokens, lengths = DocumentEncoder(tok, np.dtype(np.uint16))(["a b", "c"])
    first, second = np.split(tokens, np.cumsum(lengths)[:-1])
    assert first[0] == second[0] == tok.bos_token_id and first[-1] == second[-1] == tok.eos_token_id
    assert tok.decode(first[1:-1]) == "a b"


def test_a_tokenizer_changed_in_place_is_refused(tmp_path: Path, data_cache: Path) -> None:
    tokenizer_dir = tmp_path / "tok"
    shutil.copytree(prepare(_data_cfg(f"data.cache_dir={data_cache}")) / "tokenizer", tokenizer_dir)
    _write_jsonl(tmp_path / "docs.jsonl", [{"text": f"document number {i}"} for i in range(50)])
    cfg = _data_cfg(
        "data.source=json",
        f"data.data_files=[{tmp_path}/docs.jsonl]",
        f"data.tokenizer={tokenizer_dir}",
        f"data.cache_dir={tmp_path}/c",
        "data.validation_fraction=0.3",
    )
    out = prepare(cfg)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_tokens(["document number"])
    tok.save_pretrained(str(tokenizer_dir))
    with pytest.raises(DataError, match=rf"tokenizer .*tok' changed since {out} was prepared: its hash was \w+, now \w+"):
        prepare(cfg)
