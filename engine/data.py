"""Datasets in, token ids and loss labels out: what the trainer calls.

Rows come from a local file (.jsonl, .json, .csv, .parquet), a folder of them, a hub dataset or
``builtin:demo``. They are read as a stream, checked, tokenized and cut to ``max_length`` through
Arrow, and kept in a cache between runs (:mod:`tunedeck.engine.examples`); the train and eval
splits are memory-mapped views of that. The layouts are in :mod:`tunedeck.engine.formats`, the
readers in :mod:`tunedeck.engine.data_files`. Every user mistake is a ``DataError`` with a one-line
message and the fix, never a bare traceback.

Labels are *unshifted* (HF convention): the model predicts ``labels[t]`` from tokens ``< t``, so
the label at position 0 never counts. ``count_targets`` and the drop rule both follow that.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunedeck.engine import examples as store
from tunedeck.engine import paths
from tunedeck.engine.builtin import DEMO, DEMO_FILE
from tunedeck.engine.config import DataConfig
from tunedeck.engine.data_files import Files, folder_files, short
from tunedeck.engine.errors import DataError
from tunedeck.engine.formats import (
    FORMATS,
    IGNORE_INDEX,
    REQUIRED,
    Example,
    Tokenize,
    check_format,
    detect_format,
    prompt_ids,
    tokenize_rows,
)
from tunedeck.engine.packing import CU_K, CU_Q
from tunedeck.engine.protocol import ProgressEvent

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "REQUIRED",
    "Splits",
    "collate",
    "count_targets",
    "detect_format",
    "load_examples",
    "load_rows",
    "preview",
    "prompt_ids",
    "tokenize_rows",
]


@dataclass
class Splits:
    train: Sequence[Example]
    eval: Sequence[Example]
    format: str
    dropped: int


# ---------------------------------------------------------------- sources


def open_source(path: str, split: str = "train") -> Files | Any:
    """Local files (a file, or a folder's files for ``split``), or a ``datasets.Dataset`` from the hub."""
    source = str(DEMO_FILE) if path == DEMO else path
    p = Path(source).expanduser()
    if p.is_file():
        if p.suffix.lower() not in paths.FILE_TYPES:
            raise DataError(
                f"{p} has the unsupported extension {p.suffix.lower() or '(none)'!r}",
                f"save the data as one of {', '.join(paths.FILE_TYPES)}",
            )
        return Files(files=(p,))
    if p.is_dir():
        return folder_files(p, split)
    if paths.is_hub_dataset(source):
        return _load_hub(source, split)
    raise paths.missing_dataset(source) or DataError(f"cannot read dataset {path!r}", "check data.path")


def _load_hub(name: str, split: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"cannot load dataset {name!r}: the datasets package is not installed",
            "pip install datasets, or use a local .jsonl file",
        ) from None
    try:
        return datasets.load_dataset(name, split=split)
    except datasets.exceptions.DatasetGenerationError as e:  # downloaded, but its files do not parse
        raise DataError(
            f"dataset {name!r} (split {split!r}) has files that cannot be read: {short(e.__cause__ or e)}",
            "download its files and point data.path at them to find the bad one",
        ) from None
    except Exception as e:  # network, missing repo, bad split, gated dataset: all the user's to fix
        raise DataError(
            f"could not load dataset {name!r} (split {split!r}): {short(e)}",
            "check the name and split, your network and login, or use a local .jsonl/.json/.csv/.parquet file",
        ) from None


def _rows(source: Files | Any) -> Any:
    """Raw rows of a source, as a stream."""
    if isinstance(source, Files):
        return (row for _, _, row in source.rows())
    return iter(source)


def load_rows(path: str, split: str = "train") -> list[dict]:
    """Raw rows of a file, a folder, a hub dataset or ``builtin:demo``; an empty dataset is an error.
    All in memory: for a look at small data (the trainer streams instead)."""
    rows = list(_rows(open_source(path, split)))
    if not rows:
        raise DataError(
            f"dataset {path} has no rows", "add examples to it, or point data.path at another dataset"
        )
    return rows


def preview(path: str, n: int = 5) -> tuple[str, list[dict], int]:
    """(format, first ``n`` raw rows, total rows) for the dataset picker, read as a stream."""
    source = open_source(path)
    if isinstance(source, Files):
        stream = _rows(source)
        head = list(islice(stream, n))
        total = len(head) + sum(1 for _ in stream)
    else:
        head, total = list(islice(source, n)), len(source)
    if not head:
        raise DataError(
            f"dataset {path} has no rows", "add examples to it, or point data.path at another dataset"
        )
    return detect_format(head), head, total


# ---------------------------------------------------------------- the whole pipeline


def load_examples(
    cfg: DataConfig, tokenizer: Any, seed: int, progress: Callable[[ProgressEvent], None] | None = None
) -> Splits:
    """Load, detect (or check the forced) format, tokenize, and split off the eval examples.

    ``progress`` (the trainer's emit) gets progress events with ``unit="rows"``: stage
    ``reading`` while a local file is read and checked (``total`` unknown until the end), then
    ``tokenizing`` out of the rows read, each from 0 done to the total, a few times a second. A
    dataset tokenized before with the same settings is opened at once: one ``tokenizing`` event,
    done."""
    source = open_source(cfg.path, cfg.split)
    if isinstance(source, Files):
        identity: Any = source.stamp()
    else:
        identity = ["hub", cfg.path, cfg.split, getattr(source, "_fingerprint", None)]
    key = store.fingerprint(identity, cfg.format, tokenizer, cfg.max_length, cfg.completion_only_loss)
    prepared = store.open_cached(key)
    if prepared is None:
        fmt = check_format(_first_columns(source, cfg.path), cfg.format)
        tokenize = Tokenize(fmt, tokenizer, cfg.max_length, cfg.completion_only_loss)
        prepared = store.build(key, source, fmt, tokenize, cfg.path, progress)
    elif progress is not None:
        progress(ProgressEvent(stage="tokenizing", done=prepared.rows, total=prepared.rows, unit="rows"))
    n = len(prepared.file)
    if not n:
        raise DataError(
            f"all {prepared.rows} examples were dropped: every example is longer than max_length={cfg.max_length} "
            "tokens before its answer starts",
            "raise data.max_length, or shorten the prompts",
        )
    k = 0
    if cfg.eval_fraction > 0 and n >= 2:
        k = min(max(1, round(n * cfg.eval_fraction)), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = np.zeros(n, dtype=bool)
    held[order[:k]] = True
    # Both splits keep file order; the trainer shuffles the train split per epoch itself.
    train = store.Examples(prepared.file, np.flatnonzero(~held))
    evals = store.Examples(prepared.file, np.flatnonzero(held))
    return Splits(train=train, eval=evals, format=prepared.format, dropped=prepared.dropped)


def _first_columns(source: Files | Any, path: str) -> list[str]:
    """The columns of the first row (the format is read from them)."""
    if not isinstance(source, Files):
        if len(source) == 0:
            raise DataError(
                f"dataset {path} has no rows", "add examples to it, or point data.path at another dataset"
            )
        return list(source.column_names)
    stream = _rows(source)
    first = next(stream, None)
    stream.close()
    if first is None:
        raise DataError(
            f"dataset {path} has no rows", "add examples to it, or point data.path at another dataset"
        )
    return list(first)


# ---------------------------------------------------------------- batches


@functools.cache
def _flatten() -> Any:
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_tensors="pt")


def collate(examples: Sequence[Example], pad_token_id: int, packing: bool = False) -> dict[str, Any]:
    """A batch of tensors.

    Unpacked: right-padded ``input_ids``, ``attention_mask``, ``labels`` of shape [B, L].
    Packed (``transformers.DataCollatorWithFlattening``): one row of all examples end to end with
    ``position_ids`` restarting at 0 per example, each example's first label ``IGNORE_INDEX`` (else
    the shifted loss would train example i's last token to predict i+1's first), no attention mask,
    and the cumulative lengths of the examples (``cu_seq_lens_q/k``, int32) and the longest
    (``max_length_q/k``, int) for padding-free attention; ``packing.prepare_batch`` drops those where
    the model does not use them. Without them transformers builds a block-diagonal causal mask from
    the position ids, which it skips when the model runs with a KV cache: call it with
    ``use_cache=False``.
    """
    if packing:
        return _packed(examples)
    width = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels_t = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels_t[row, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels_t}


def _packed(examples: Sequence[Example]) -> dict[str, Any]:
    batch = dict(_flatten()(list(examples)))
    batch[CU_K] = batch[CU_Q]  # the library makes two equal tensors: queries and keys have the same lengths
    return batch


def count_targets(batch: dict) -> int:
    """Label tokens that count in the loss once the model shifts labels by one."""
    return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())
