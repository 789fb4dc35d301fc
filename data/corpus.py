"""Document sources: the embedded corpus (Python's own standard library) and `datasets` sources."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

from zeroforge.data.config import DataConfig
from zeroforge.data.errors import DataError

# Test suites and the IDE are left out: they are large and unlike the rest of the library.
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
_FILE_BUILDERS = ("json", "parquet", "text", "csv", "arrow")


def embedded_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    # Excluded directories are pruned, not walked: site-packages (torch, transformers, ...) holds
    # tens of thousands of files, which every start-up would otherwise list (about 2 s a rank).
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _EXCLUDED_DIRS]
        files += [Path(directory, name) for name in names if name.endswith(".py")]
    return sorted(files)


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


# Rows taken from a `datasets` source at once: one row at a time costs more than tokenizing it
# once prepare runs a dozen workers.
_ROWS_PER_READ = 1024


def iter_documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """Yield (key, text) for every document of the source, in a fixed order, up to max_documents.

    Keys (the validation split's hash input) are row numbers for `datasets` sources and file
    names for the embedded corpus.
    """
    documents = 0
    for key, text in _documents(cfg):
        if cfg.max_documents is not None and documents >= cfg.max_documents:
            break
        documents += 1
        yield key, text
    if documents == 0:
        raise DataError(
            f"data source {describe_source(cfg)} yielded no documents; expected at least one non-empty text in field {cfg.text_field!r}."
        )


def _documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    if cfg.source == "embedded":
        root = Path(sysconfig.get_paths()["stdlib"])
        for path in embedded_files():
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield str(path.relative_to(root)), text
        return
    field = cfg.text_field  # read once: an OmegaConf attribute read per document costs as much as a small document
    for index, row in enumerate(dataset_rows(cfg, open_dataset(cfg), _ROWS_PER_READ)):
        text = row_text(cfg, row, field, str(index))
        if text.strip():
            yield str(index), text


def open_dataset(cfg: DataConfig):
    """The `datasets` source as a streaming IterableDataset (nothing read yet)."""
    import datasets

    files = _local_files(cfg)
    if cfg.source in _FILE_BUILDERS and not files:
        raise DataError(f"data.source={cfg.source!r} reads local files; expected data.data_files, found none.")
    try:
        return datasets.load_dataset(cfg.source, name=cfg.subset, data_files=files or None, split=cfg.split, streaming=True)
    except (OSError, ValueError) as err:
        raise DataError(f"data source {describe_source(cfg)} could not be opened: {err}") from None


def dataset_rows(cfg: DataConfig, dataset, rows_per_read: int) -> Iterator[dict]:
    """The rows of a streaming dataset one by one, read rows_per_read at a time."""
    for batch in dataset_batches(cfg, dataset, rows_per_read):
        columns = list(batch.items())
        for i in range(len(columns[0][1])):
            yield {name: values[i] for name, values in columns}


def dataset_batches(cfg: DataConfig, dataset, rows_per_read: int) -> Iterator[dict]:
    """Column batches of a streaming dataset. Not iter(dataset): inside a DataLoader worker that
    reads only the worker's share of the files, and every reader here chooses its own."""
    batches = dataset.iter(batch_size=rows_per_read)
    try:
        first = next(batches, None)
    except (OSError, ValueError) as err:
        raise DataError(f"data source {describe_source(cfg)} could not be opened: {err}") from None
    if first is not None:
        yield first
        yield from batches


def row_text(cfg: DataConfig, row: dict, field: str, key: str) -> str:
    """The document text of a row, or a DataError naming the document (by key) and the field."""
    if field not in row:
        raise DataError(
            f"data source {describe_source(cfg)}: document {key} has no field {field!r} (data.text_field); its fields are {sorted(row)}."
        )
    text = row[field]
    if not isinstance(text, str):
        raise DataError(f"data source {describe_source(cfg)}: field {field!r} of document {key} is {type(text).__name__}, expected text.")
    return text


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
