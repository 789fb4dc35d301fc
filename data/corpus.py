"""Document sources: the embedded corpus (Python's own standard library) and `datasets` sources."""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import sys
import sysconfig
from pathlib import Path
from typing import Iterator, Optional

from zeroforge.data.config import DataConfig
from zeroforge.data.errors import DataError

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


# Rows a reader that needs no position takes from a `datasets` source at once: one row at a time
# costs more than tokenizing it once prepare runs a dozen workers.
_ROWS_PER_READ = 1024


def iter_documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """Yield (key, text) for every document of the source, in a fixed order."""
    return iter(SourceReader(cfg, rows_per_read=_ROWS_PER_READ))


class SourceReader:
    """The documents of a source, in a fixed order, read from a position that can be saved.

    position() is where a reader built with it continues: after the last document yielded. It
    holds the next row, the documents yielded so far (for max_documents) and, for `datasets`
    sources, the dataset's own state_dict, which reopens at that file and row instead of reading
    every row before it; it is exact only for a reader that reads one row at a time. Keys (the
    validation split's hash input) are row numbers for `datasets` sources and file names for the
    embedded corpus, however the reader started.
    """

    def __init__(self, cfg: DataConfig, position: Optional[dict] = None, rows_per_read: int = 1):
        self.cfg, self.rows_per_read = cfg, rows_per_read
        # Plain values: an OmegaConf attribute read per document costs as much as a small document.
        self._max_documents: Optional[int] = cfg.max_documents
        self._text_field: str = cfg.text_field
        start = position or {"row": 0, "documents": 0, "dataset": None}
        self._row, self._documents, self._dataset_state = start["row"], start["documents"], start["dataset"]
        self._dataset = None  # the open streaming dataset, once rows have been read from it

    def position(self) -> dict:
        if self.rows_per_read != 1:
            raise RuntimeError(f"SourceReader(rows_per_read={self.rows_per_read}) has no exact position.")
        dataset = self._dataset.state_dict() if self._dataset is not None else self._dataset_state
        return {"row": self._row, "documents": self._documents, "dataset": dataset}

    def __iter__(self) -> Iterator[tuple[str, str]]:
        from_start = self._row == 0
        for key, text in self._rows():
            if self._max_documents is not None and self._documents >= self._max_documents:
                break
            self._documents += 1
            yield key, text
        if from_start and self._documents == 0:
            raise DataError(
                f"data source {describe_source(self.cfg)} yielded no documents; expected at least one "
                f"non-empty text in field {self.cfg.text_field!r}."
            )

    def _rows(self) -> Iterator[tuple[str, str]]:
        """(key, text) of the non-empty rows from the position on; self._row follows each row read."""
        cfg = self.cfg
        if cfg.source == "embedded":
            root = Path(sysconfig.get_paths()["stdlib"])
            files = embedded_files()
            for row in range(self._row, len(files)):
                self._row = row + 1
                text = files[row].read_text(encoding="utf-8", errors="replace")
                if text.strip():
                    yield str(files[row].relative_to(root)), text
            return
        import datasets

        files = _local_files(cfg)
        if cfg.source in _FILE_BUILDERS and not files:
            raise DataError(f"data.source={cfg.source!r} reads local files; expected data.data_files, found none.")
        try:
            dataset = datasets.load_dataset(
                cfg.source, name=cfg.subset, data_files=files or None, split=cfg.split, streaming=True
            )
            if self._dataset_state is not None:
                dataset.load_state_dict(self._dataset_state)
            rows = _rows_of(dataset, self.rows_per_read)
            first = next(rows, None)
        except (OSError, ValueError) as err:
            raise DataError(f"data source {describe_source(cfg)} could not be opened: {err}") from None
        if first is None:
            return
        self._dataset = dataset
        field = self._text_field
        for index, row in enumerate(itertools.chain([first], rows), start=self._row):
            self._row = index + 1
            if field not in row:
                raise DataError(
                    f"data source {describe_source(cfg)}: document {index} has no field "
                    f"{field!r} (data.text_field); its fields are {sorted(row)}."
                )
            text = row[field]
            if not isinstance(text, str):
                raise DataError(
                    f"data source {describe_source(cfg)}: field {field!r} of document "
                    f"{index} is {type(text).__name__}, expected text."
                )
            if text.strip():
                yield str(index), text


def _rows_of(dataset, rows_per_read: int) -> Iterator[dict]:
    """The rows of a streaming dataset one by one, read rows_per_read at a time. Not iter(dataset):
    inside a DataLoader worker that reads only the worker's share of the files, and every reader
    here needs all of them."""
    for batch in dataset.iter(batch_size=rows_per_read):
        columns = list(batch.items())
        for i in range(len(columns[0][1])):
            yield {name: values[i] for name, values in columns}


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
