"""Preparing corpora into shards: the embedded default, local files, and the errors a user can cause."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from data.corpus import embedded_files, is_validation
from data.errors import DataError
from data.prepare import prepare, prepared_dir
from data.shards import TokenStore, load_manifest
from launcher.config import compose_config
from tests.conftest import REPO


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
    code = "from data.corpus import is_validation; print([k for k in (f'doc-{i}' for i in range(10000)) if is_validation(k, 0.1)])"
    other = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"}, check=True)
    assert other.stdout.strip() == str(held)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_local_jsonl_with_an_autotokenizer(tmp_path: Path, data_cache: Path) -> None:
    tokenizer_dir = prepare(_data_cfg(f"data.cache_dir={data_cache}")) / "tokenizer"
    rows = [{"content": f"def function_{i}(a, b):\n    return a * {i} + b\n"} for i in range(200)]
    _write_jsonl(tmp_path / "docs.jsonl", rows)
    cfg = _data_cfg(
        "data.name=local", "data.source=json", f"data.data_files=[{tmp_path}/*.jsonl]", "data.text_field=content",
        f"data.tokenizer={tokenizer_dir}", f"data.cache_dir={tmp_path / 'cache'}", "data.validation_fraction=0.2",
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
    with pytest.raises(DataError, match="yielded no documents"):
        prepare(cfg)
    assert not list((tmp_path / "c").glob("*/manifest.json"))


def test_missing_field_and_non_text_values_are_named(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "a.jsonl", [{"body": "x"}])
    cfg = _data_cfg("data.source=json", f"data.data_files=[{tmp_path}/a.jsonl]", f"data.cache_dir={tmp_path}/c")
    with pytest.raises(DataError, match=r"no field 'text' .*\['body'\]"):
        prepare(cfg)
    _write_jsonl(tmp_path / "b.jsonl", [{"text": 3}])
    cfg = _data_cfg("data.source=json", f"data.data_files=[{tmp_path}/b.jsonl]", f"data.cache_dir={tmp_path}/c")
    with pytest.raises(DataError, match="is int, expected text"):
        prepare(cfg)


def test_truncated_shard_is_detected(tmp_path: Path, data_cache: Path) -> None:
    tokenizer_dir = prepare(_data_cfg(f"data.cache_dir={data_cache}")) / "tokenizer"
    (tmp_path / "t.txt").write_text("\n".join(f"line {i} of text" for i in range(300)))
    cfg = _data_cfg("data.source=text", f"data.data_files=[{tmp_path}/t.txt]", f"data.tokenizer={tokenizer_dir}",
                    f"data.cache_dir={tmp_path}/c", "data.validation_fraction=0.3")
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
