"""Tokenized examples on disk: built through Arrow, kept between runs, read one at a time.

A dataset is tokenized once per (content, tokenizer, format, max_length, completion_only_loss,
and the code that does it): its rows are read as a stream, checked and written to an Arrow file,
then tokenized with ``datasets.Dataset.map(batched=True)`` (memory-mapped input, batches of rows)
into ``input_ids``/``labels`` (int32) in a cache folder named by the fingerprint of all of that,
under ``<builtin cache>/data/``. A second run with the same file, tokenizer and settings opens
that folder and starts at once. Nothing is ever held whole in memory: the splits read each
example from the file when it is asked for. A local file is known by its path, size and
modification time; a hub dataset by its ``datasets`` fingerprint.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import functools
import hashlib
import json
import os
import shutil
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

from tunedeck.engine import builtin
from tunedeck.engine.data_files import Files, short
from tunedeck.engine.errors import DataError
from tunedeck.engine.formats import COLUMNS, Example, Rules, Tokenize, check_row
from tunedeck.engine.protocol import ProgressEvent

# Bump when what a cache folder holds changes. How rows become examples is in the fingerprint (the
# source of the modules that do it), so a change there never reuses an old folder.
CACHE_VERSION = 1
# Rows per batch read, tokenized and written: memory stays at a few batches whatever the file.
BATCH = 1000
# Folders not opened for this long are removed when another is built.
KEEP_UNUSED_S = 30 * 86400

# Where progress events go (the trainer's emit); they say what is done to how many rows.
Progress = Callable[[ProgressEvent], None]


def cache_root() -> Path:
    return builtin.cache_dir() / "data"


# ---------------------------------------------------------------- the examples


class TokenFile:
    """The examples of a tokenized Arrow file (``input_ids``/``labels``, list<int32>), read one at a
    time with ``pread``: the file's layout is read once (where each row's ids start, how many), and
    a row is two reads of a few KB. Nothing of the file stays mapped, so the process's RSS does not
    grow with the pages a run has read (they are the kernel's page cache)."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa

        self.path = path
        # Mapped only to learn the layout (zero-copy); unmapped when these go.
        whole = pa.memory_map(str(path)).read_buffer()
        table = pa.ipc.open_stream(whole).read_all()
        ids, ids_len = _layout(table.column("input_ids"), whole)
        labels, labels_len = _layout(table.column("labels"), whole)
        del table, whole
        if not np.array_equal(ids_len, labels_len):
            raise ValueError(f"{path}: input_ids and labels differ in length")
        self._ids, self._labels, self._len = ids, labels, ids_len * 4
        self._fd = os.open(path, os.O_RDONLY)
        self._closer = weakref.finalize(self, os.close, self._fd)

    def __len__(self) -> int:
        return len(self._len)

    def row(self, r: int) -> Example:
        n = int(self._len[r])
        return {
            "input_ids": np.frombuffer(os.pread(self._fd, n, int(self._ids[r])), dtype=np.int32).tolist(),
            "labels": np.frombuffer(os.pread(self._fd, n, int(self._labels[r])), dtype=np.int32).tolist(),
        }


def _layout(column: Any, whole: Any) -> tuple[np.ndarray, np.ndarray]:
    """(byte position in the file, length) of each row of a list<int32> column of a table read
    zero-copy from ``whole``, the buffer of the whole file."""
    positions, lengths = [], []
    for chunk in column.chunks:
        data = chunk.values.buffers()[1]
        start = 0 if data is None else data.address - whole.address
        if data is not None and not 0 <= start <= whole.size - data.size:
            raise ValueError("the Arrow file's buffers are not in the file (compressed?)")
        offsets = chunk.offsets.to_numpy().astype(np.int64)
        positions.append(start + 4 * (chunk.values.offset + offsets[:-1]))
        lengths.append(np.diff(offsets))
    if not positions:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(positions), np.concatenate(lengths)


class Examples(Sequence[Example]):
    """The rows ``rows`` (indices, in this order) of a :class:`TokenFile`, as ``{"input_ids",
    "labels"}`` lists; ``[i]`` costs a few microseconds."""

    def __init__(self, file: TokenFile, rows: np.ndarray) -> None:
        self._file, self._rows = file, rows

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, i: int) -> Example: ...
    @overload
    def __getitem__(self, i: slice) -> list[Example]: ...
    def __getitem__(self, i: int | slice) -> Example | list[Example]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return self._file.row(int(self._rows[i]))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # compared by value, like a list

    def __add__(self, other: Sequence[Example]) -> list[Example]:
        return [*self, *other]

    def __repr__(self) -> str:
        return f"Examples({len(self)} of {self._file.path})"


# ---------------------------------------------------------------- the cache


@dataclass
class Prepared:
    file: TokenFile
    format: str
    rows: int  # rows read
    dropped: int  # rows without a target token left within max_length
    cached: bool  # opened from an earlier run's folder


def fingerprint(source: Any, fmt: str, tokenizer: Any, max_length: int, completion_only_loss: bool) -> str:
    """The name of the cache folder of a dataset tokenized with these settings."""
    parts = {
        "version": CACHE_VERSION,
        "source": source,
        "format": fmt,
        "max_length": max_length,
        "completion_only_loss": completion_only_loss,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "code": _code_fingerprint(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


@functools.cache
def _code_fingerprint() -> str:
    from tunedeck.engine import chat, data_files, formats

    h = hashlib.sha256()
    for module in (chat, data_files, formats, sys.modules[__name__]):
        h.update(Path(str(module.__file__)).read_bytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What decides how a tokenizer turns text into ids: its whole definition (vocabulary, merges,
    normalizer, pre- and post-processing), special tokens and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        # Calls set these on the backend (truncation=True does); they are not part of what it is.
        definition.pop("truncation", None)
        definition.pop("padding", None)
        h.update(json.dumps(definition, sort_keys=True).encode())
    else:  # a slow (Python) tokenizer: datasets hashes the object by pickling it
        from datasets.fingerprint import Hasher

        h.update(Hasher.hash(tokenizer).encode())
    extra = [
        type(tokenizer).__name__,
        str(getattr(tokenizer, "chat_template", None)),
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.eos_token,
    ]
    h.update(json.dumps(extra, default=str).encode())
    return h.hexdigest()


def open_cached(key: str) -> Prepared | None:
    """The examples of an earlier run with the same fingerprint, or None."""
    folder = cache_root() / key
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("version") != CACHE_VERSION:
            return None
        file = TokenFile(folder / "examples.arrow")
    except (OSError, ValueError, KeyError):  # pyarrow's errors are ValueErrors (ArrowInvalid)
        return None
    if len(file) != meta.get("examples"):
        return None
    with contextlib.suppress(OSError):
        os.utime(folder / "meta.json")  # last used: kept while in use
    return Prepared(file, meta["format"], meta["rows"], meta["dropped"], cached=True)


def build(
    key: str,
    source: Files | Any,
    fmt: str,
    tokenize: Tokenize,
    describe: str,
    progress: Progress | None,
) -> Prepared:
    """Read, check and tokenize ``source`` (local files, or a ``datasets.Dataset`` from the hub)
    into the cache folder ``key``, and open it."""
    import datasets

    root = cache_root()
    tmp = root / f".{key}.tmp-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _prune(root)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        bars_were_on = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # the engine reports its own progress
        try:
            if isinstance(source, Files):
                raw, where = _write_rows(source, fmt, tokenize.rules, tmp / "rows.arrow", progress)
                checked = True
            else:
                raw, where, checked = source, (lambda i: f"row {i + 1}"), False
            rows = len(raw)
            if rows == 0:
                raise DataError(
                    f"dataset {describe} has no rows",
                    "add examples to it, or point data.path at another dataset",
                )
            tick = _Ticker(progress, "tokenizing", rows)

            def batch(columns: dict[str, list], indices: list[int]) -> dict[str, list]:
                names = list(columns)
                at = [where(i) for i in indices]
                table = [
                    dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)
                ]
                if not checked:
                    table = [check_row(r, fmt, a, tokenize.rules) for r, a in zip(table, at, strict=True)]
                examples, _ = tokenize(table, at)
                tick(indices[-1] + 1)
                return {
                    "input_ids": [e["input_ids"] for e in examples],
                    "labels": [e["labels"] for e in examples],
                }

            out = raw.map(
                batch,
                batched=True,
                batch_size=BATCH,
                writer_batch_size=BATCH,
                with_indices=True,
                remove_columns=raw.column_names,
                features=datasets.Features(
                    {
                        "input_ids": datasets.List(datasets.Value("int32")),
                        "labels": datasets.List(datasets.Value("int32")),
                    }
                ),
                cache_file_name=str(tmp / "examples.arrow"),
                new_fingerprint=key,
                load_from_cache_file=False,
            )
            tick(rows, force=True)  # (the last batch may have been within the interval)
            examples = len(out)
            del out, raw
        finally:
            if bars_were_on:
                datasets.enable_progress_bars()
        (tmp / "rows.arrow").unlink(missing_ok=True)
        meta = {
            "version": CACHE_VERSION,
            "format": fmt,
            "rows": rows,
            "examples": examples,
            "dropped": rows - examples,
            "source": describe,
            "files": source.stamp() if isinstance(source, Files) else None,
            "code": _code_fingerprint(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if (root / key).exists() and open_cached(key) is None:  # left by an older version, or damaged
            shutil.rmtree(root / key, ignore_errors=True)
        try:
            tmp.rename(root / key)
        except OSError:  # another run built the same folder meanwhile: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        error = _write_error(root, e)  # before the clean-up, which frees the space it names
        shutil.rmtree(tmp, ignore_errors=True)
        raise error from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prepared = open_cached(key)
    if prepared is None:
        raise DataError(
            f"the tokenized data in {root / key} cannot be read back", f"delete {root} and run again"
        )
    prepared.cached = False
    return prepared


def _write_error(root: Path, e: OSError) -> DataError:
    cause = e.strerror or short(e)
    if e.errno == errno.ENOSPC:
        try:
            free = shutil.disk_usage(root).free / 2**20
            cause = f"no space left on device ({free:.1f} MB free)"
        except OSError:
            cause = "no space left on device"
    return DataError(
        f"cannot write the tokenized data to {root}: {cause}",
        "free some space there, or set TUNEDECK_CACHE to a folder on a disk with room",
    )


def _write_rows(
    source: Files, fmt: str, rules: Rules, path: Path, progress: Progress | None
) -> tuple[Any, Callable[[int], str]]:
    """The rows of local files, checked and reduced to the columns of ``fmt``, as an Arrow dataset;
    and the name of the row at each index for later errors."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    starts: list[int] = []  # index of the first row of each file
    files: list[Path] = []
    tick = _Ticker(progress, "reading", None)
    n = 0
    writer = ArrowWriter(features=_features(fmt), path=str(path), writer_batch_size=BATCH)
    try:
        for file, number, row in source.rows():
            if not files or files[-1] != file:
                files.append(file)
                starts.append(n)
            writer.write(check_row(row, fmt, source.where(file, number), rules))
            n += 1
            if n % BATCH == 0:
                tick(n)
        writer.finalize()
    finally:
        writer.close()
    tick(n, force=True, total=n)

    def where(i: int) -> str:
        f = bisect.bisect_right(starts, i) - 1
        return source.where(files[f], i - starts[f] + 1)

    return datasets.Dataset.from_file(str(path)), where


def _features(fmt: str) -> Any:
    from datasets import Features, List, Value

    text = Value("string")
    if fmt == "messages":
        return Features({"messages": List({"role": text, "content": text})})
    if fmt == "tokenized":
        return Features({"input_ids": List(Value("int64")), "labels": List(Value("int64"))})
    return Features(dict.fromkeys(COLUMNS[fmt], text))


def _prune(root: Path) -> None:
    """Remove folders that no run can open again (their files changed or are gone, or another
    version of this code made them), folders unused for a month, and what a build that died left."""
    now = time.time()
    for folder in root.iterdir():
        if folder.name.startswith("."):
            pid = folder.name.rpartition("-")[2]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)
            continue
        meta_path = folder / "meta.json"
        stale = False
        try:
            meta = json.loads(meta_path.read_text())
            stale = (
                now - meta_path.stat().st_mtime > KEEP_UNUSED_S
                or meta.get("code") != _code_fingerprint()  # made by another version: never opened again
                or not _files_unchanged(meta.get("files"))
            )
        except (OSError, ValueError):
            with contextlib.suppress(OSError):
                stale = now - folder.stat().st_mtime > 3600  # unreadable, and not being written
        if stale:
            shutil.rmtree(folder, ignore_errors=True)


def _files_unchanged(stamp: list | None) -> bool:
    if stamp is None:
        return True
    for path, size, mtime in stamp:
        try:
            st = os.stat(path)
        except OSError:
            return False
        if (st.st_size, st.st_mtime_ns) != (size, mtime):
            return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Ticker:
    """Reports ``done`` rows of ``total`` (None: unknown yet) as progress events of ``stage``: at
    once (0 done), then at most five times a second, and when told it is the end (once)."""

    def __init__(self, progress: Progress | None, stage: str, total: int | None) -> None:
        self.progress, self.stage, self.total, self.last = progress, stage, total, time.monotonic()
        self.sent: tuple[int, int | None] = (0, total)
        if progress is not None:
            progress(ProgressEvent(stage=stage, done=0, total=total, unit="rows"))

    def __call__(self, done: int, force: bool = False, total: int | None = None) -> None:
        now, total = time.monotonic(), total or self.total
        if self.progress is None or (done, total) == self.sent or not (force or now - self.last >= 0.2):
            return
        self.last, self.sent = now, (done, total)
        self.progress(ProgressEvent(stage=self.stage, done=done, total=total, unit="rows"))
