"""Document sources: the embedded corpus (Python's own standard library) and `datasets` sources."""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

from data.config import DataConfig
from data.errors import DataError

# Test suites and the IDE are left out: they are large and unlike the rest of the library.
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
_FILE_BUILDERS = ("json", "parquet", "text", "csv", "arrow")


def embedded_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p for p in root.rglob("*.py") if not _EXCLUDED_DIRS.intersection(p.relative_to(root).parts)
    )


def is_validation(key: str, fraction: float) -> bool:
    """Hold out a document by a hash of its key, so the split never depends on the order read."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return h % 1_000_000 < fraction * 1_000_000


def _local_files(cfg: DataConfig) -> list[str]:
    files: list[str] = []
    for pattern in cfg.data_files:
        matched = sorted(glob.glob(str(Path(pattern).expanduser())))
        if not matched:
            raise DataError(
                f"data.data_files: no file matches {pattern!r} for source {cfg.source!r}; "
                "expected at least one existing json/jsonl/parquet/text file."
            )
        files.extend(matched)
    return files


def iter_documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """Yield (key, text) for every document of the source, in a fixed order."""
    count = 0
    for key, text in _raw_documents(cfg):
        if cfg.max_documents is not None and count >= cfg.max_documents:
            break
        count += 1
        yield key, text
    if count == 0:
        raise DataError(
            f"data source {describe_source(cfg)} yielded no documents; expected at least one "
            f"non-empty text in field {cfg.text_field!r}."
        )


def _raw_documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    if cfg.source == "embedded":
        root = Path(sysconfig.get_paths()["stdlib"])
        for path in embedded_files():
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield str(path.relative_to(root)), text
        return
    import datasets

    files = _local_files(cfg)
    if cfg.source in _FILE_BUILDERS and not files:
        raise DataError(f"data.source={cfg.source!r} reads local files; expected data.data_files, found none.")
    try:
        dataset = datasets.load_dataset(
            cfg.source, name=cfg.subset, data_files=files or None, split=cfg.split, streaming=True
        )
        rows = iter(dataset)
        first = next(rows, None)
    except (OSError, ValueError) as err:
        raise DataError(f"data source {describe_source(cfg)} could not be opened: {err}") from None
    if first is None:
        return
    for index, row in enumerate(itertools.chain([first], rows)):
        if cfg.text_field not in row:
            raise DataError(
                f"data source {describe_source(cfg)}: document {index} has no field "
                f"{cfg.text_field!r} (data.text_field); its fields are {sorted(row)}."
            )
        text = row[cfg.text_field]
        if not isinstance(text, str):
            raise DataError(
                f"data source {describe_source(cfg)}: field {cfg.text_field!r} of document "
                f"{index} is {type(text).__name__}, expected text."
            )
        if text.strip():
            yield str(index), text


def describe_source(cfg: DataConfig) -> str:
    if cfg.source == "embedded":
        return "'embedded' (the Python standard library)"
    files = f" with data_files {list(cfg.data_files)}" if cfg.data_files else ""
    return f"{cfg.source!r}{files}"


def source_fingerprint(cfg: DataConfig) -> str:
    """What identifies the raw documents: file names, sizes and times, or the hub name."""
    if cfg.source == "embedded":
        root = Path(sysconfig.get_paths()["stdlib"])
        parts: list = [sys.version_info[:3]]
        parts += [(str(p.relative_to(root)), p.stat().st_size) for p in embedded_files()]
    else:
        parts = [cfg.source, cfg.subset, cfg.split]
        parts += [(f, Path(f).stat().st_size, Path(f).stat().st_mtime_ns) for f in _local_files(cfg)]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()
