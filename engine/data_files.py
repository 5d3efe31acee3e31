"""Rows of local data files (.jsonl, .json, .csv, .parquet) and folders of them, read as a stream.

A file is never held whole in memory (except a .json array, which is one JSON value): JSON lines
are parsed one at a time, CSV rows as the reader reaches them, parquet in record batches. Every
syntax error names the file and its line. A folder's files for a split are found by the rules of
``datasets.load_dataset`` (``train.jsonl``, ``data/train-00000.parquet``, ...; every file is
``train`` when no file name says otherwise), and read with the same readers, so a bad file is
named, not blamed on the network.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunedeck.engine import paths
from tunedeck.engine.errors import DataError

# (file, row number within it from 1, row)
Row = tuple[Path, int, dict[str, Any]]


@dataclass(frozen=True)
class Files:
    """One data file, or the files of a folder for one split."""

    files: tuple[Path, ...]
    folder: Path | None = None

    def stamp(self) -> list[tuple[str, int, int]]:
        """What identifies the content for the cache: path, size and modification time of each file."""
        out = []
        for f in self.files:
            st = f.stat()
            out.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
        return out

    def rows(self) -> Iterator[Row]:
        for f in self.files:
            for number, row in read_file(f):
                yield f, number, row

    def where(self, file: Path, number: int) -> str:
        """How an error names a row: ``row N``, or ``FILE, row N`` for a folder of files."""
        return f"{file}, row {number}" if self.folder is not None else f"row {number}"


def read_file(p: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(row number, row)`` of one file, by its extension."""
    suffix = p.suffix.lower()
    readers = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}
    if suffix not in readers:
        raise DataError(
            f"{p} has the unsupported extension {suffix or '(none)'!r}",
            f"save the data as one of {', '.join(paths.FILE_TYPES)}",
        )
    try:
        yield from readers[suffix](p)
    except OSError as e:  # unreadable (permissions, a disk error, gone meanwhile)
        raise DataError(
            f"cannot read {p}: {e.strerror or short(e)}", "check the file and its permissions"
        ) from None


def folder_files(folder: Path, split: str) -> Files:
    """The data files of ``split`` in a folder, named by the rules ``datasets.load_dataset`` uses."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(str(folder))
        found = {
            str(k): [Path(f) for f in v]
            for k, v in DataFilesDict.from_patterns(patterns, str(folder)).items()
        }
    except Exception:  # datasets raises EmptyDatasetError (and others) for a folder without data files
        found = {}
    found = {k: [f for f in v if f.suffix.lower() in paths.FILE_TYPES] for k, v in found.items()}
    found = {k: v for k, v in found.items() if v}
    if not found:
        raise DataError(
            f"folder {folder} holds no {', '.join(paths.FILE_TYPES)} files",
            "point data.path at a data file, or at a folder of them",
        )
    if split not in found:
        raise DataError(
            f"folder {folder} has no files for split {split!r} (it has {', '.join(sorted(found))})",
            f"set data.split to one of {', '.join(sorted(found))}, or name a file after the split (e.g. {split}.jsonl)",
        )
    return Files(files=tuple(sorted(found[split])), folder=folder)


# ---------------------------------------------------------------- the readers


def _decode(p: Path, raw: bytes, number: int, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{p}, line {number}: not UTF-8 text (byte {offset + e.start})", "re-save the file as UTF-8"
        ) from None


def _jsonl(p: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    end, row_number = 0, 0
    with p.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            start, end = end, end + len(raw)
            if number == 1 and raw.startswith(codecs.BOM_UTF8):  # editors on Windows prepend one
                raw, start = raw[len(codecs.BOM_UTF8) :], start + len(codecs.BOM_UTF8)
            line = _decode(p, raw, number, start).rstrip("\r\n")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{p}, line {number}: malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno})",
                    "fix that line: each line must be one complete JSON object",
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{p}, line {number}: expected a JSON object, got {type(row).__name__}",
                    'write each line as an object such as {"prompt": ..., "completion": ...}',
                )
            row_number += 1
            yield row_number, row


def _json(p: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    raw = p.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{p}, line {line}: not UTF-8 text (byte {e.start})", "re-save the file as UTF-8"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # a JSON-lines file saved as .json: read it as what it is
            del text, raw
            yield from _jsonl(p)
            return
        raise DataError(
            f"{p}, line {e.lineno}: malformed JSON ({e.msg})", "fix the JSON syntax there"
        ) from None
    del text, raw
    if isinstance(data, dict):
        key = next((k for k in ("data", "train") if isinstance(data.get(k), list)), None)
        if key is None:
            raise DataError(
                f"{p} holds an object without a 'data' or 'train' list (keys: {', '.join(map(str, data)) or 'none'})",
                'write a list of examples, or {"data": [...]}',
            )
        data = data[key]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(
            f"{p} is not a list of JSON objects", 'write [{"prompt": ..., "completion": ...}, ...]'
        )
    yield from enumerate(data, start=1)


def _csv(p: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with p.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        number = 0
        try:
            for number, row in enumerate(reader, start=1):  # noqa: B007 (read after the loop on an error)
                yield number, dict(row)
        except csv.Error as e:
            raise DataError(
                f"{p}, line {reader.line_num}: not valid CSV ({e})",
                "fix the quoting, or save the data as .jsonl",
            ) from None
        except UnicodeDecodeError:
            line, byte = _first_bad_byte(p)
            raise DataError(
                f"{p}, line {line}: not UTF-8 text (byte {byte})", "re-save the file as UTF-8"
            ) from None


def _first_bad_byte(p: Path) -> tuple[int, int]:
    """(line, byte offset) of the first byte that is not UTF-8, read in chunks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with p.open("rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                # e.start counts in what the decoder held back from the last chunk plus this one
                held = len(e.object) - len(chunk)
                bad = offset - held + e.start
                return line + chunk.count(b"\n", 0, max(0, e.start - held)), bad
            line += chunk.count(b"\n")
            offset += len(chunk)
    return line, offset


def _parquet(p: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(p)
        number = 0
        for batch in reader.iter_batches(batch_size=1000):
            for row in batch.to_pylist():
                number += 1
                yield number, row
    except DataError:
        raise
    except Exception as e:  # pyarrow raises its own error types for a bad file
        raise DataError(f"{p} is not a readable parquet file ({short(e)})", "re-export the file") from None


def short(e: BaseException) -> str:
    """The first line of an exception's message, at most 200 characters."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= 200 else text[:197] + "..."
