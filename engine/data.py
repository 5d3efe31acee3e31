"""Datasets in, token ids and loss labels out.

Rows come from a local file (.jsonl, .json, .csv, .parquet), a hub dataset or ``builtin:demo``.
Five layouts are understood (prompt/completion, alpaca, chat messages, plain text, and rows that
are already token ids); each becomes ``{"input_ids", "labels"}`` with ``IGNORE_INDEX`` where no
loss is taken. Every user mistake is a ``DataError`` with a one-line message and the fix, never a
bare traceback.

Labels are *unshifted* (HF convention): the model predicts ``labels[t]`` from tokens ``< t``, so
the label at position 0 never counts. ``count_targets`` and the drop rule both follow that.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunedeck.engine import paths
from tunedeck.engine.builtin import DEMO, DEMO_FILE
from tunedeck.engine.config import DataConfig
from tunedeck.engine.errors import DataError

IGNORE_INDEX = -100
FORMATS = ("prompt_completion", "alpaca", "messages", "text", "tokenized")
REQUIRED = {
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "text": ("text",),
    "tokenized": ("input_ids",),
}
# The short Alpaca layout: the long preamble of the original costs tokens and teaches nothing.
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass
class Splits:
    train: list[dict]
    eval: list[dict]
    format: str
    dropped: int


# ---------------------------------------------------------------- loading


def load_rows(path: str, split: str = "train") -> list[dict]:
    """Raw rows of a file, a hub dataset or ``builtin:demo``; an empty dataset is an error."""
    source = str(DEMO_FILE) if path == DEMO else path
    p = Path(source).expanduser()
    if p.is_file():
        suffix = p.suffix.lower()
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        if suffix not in readers:
            raise DataError(
                f"{p} has the unsupported extension {suffix or '(none)'!r}",
                f"save the data as one of {', '.join(paths.FILE_TYPES)}",
            )
        rows = readers[suffix](p)
    elif paths.is_hub_dataset(source):
        rows = _load_hub(source, split)
    else:
        raise paths.missing_dataset(source) or DataError(f"cannot read dataset {path!r}", "check data.path")
    if not rows:
        raise DataError(
            f"dataset {path} has no rows", "add examples to it, or point data.path at another dataset"
        )
    return rows


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8-sig")  # -sig: editors on Windows prepend a BOM
    except UnicodeDecodeError as e:
        raise DataError(f"{p} is not UTF-8 text (byte {e.start})", "re-save the file as UTF-8") from None


def _read_jsonl(p: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(_read_text(p).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{p}, line {number}: malformed JSON ({e.msg} at column {e.colno})",
                "fix that line: each line must be one complete JSON object",
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"{p}, line {number}: expected a JSON object, got {type(row).__name__}",
                'write each line as an object such as {"prompt": ..., "completion": ...}',
            )
        rows.append(row)
    return rows


def _read_json(p: Path) -> list[dict]:
    text = _read_text(p)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # a JSON-lines file saved as .json: read it as what it is
            return _read_jsonl(p)
        raise DataError(
            f"{p}, line {e.lineno}: malformed JSON ({e.msg})", "fix the JSON syntax there"
        ) from None
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
    return data


def _read_csv(p: Path) -> list[dict]:
    import io

    try:
        return [dict(r) for r in csv.DictReader(io.StringIO(_read_text(p), newline=""))]
    except csv.Error as e:
        raise DataError(
            f"{p} is not valid CSV ({e})", "fix the quoting, or save the data as .jsonl"
        ) from None


def _read_parquet(p: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    try:
        if pq is not None:
            return pq.read_table(p).to_pylist()
        from datasets import Dataset

        return Dataset.from_parquet(str(p)).to_list()
    except ImportError:
        raise DataError(
            f"cannot read {p}: neither pyarrow nor datasets is installed",
            "pip install pyarrow, or save the data as .jsonl",
        ) from None
    except Exception as e:  # pyarrow raises its own error types for a bad file
        raise DataError(f"{p} is not a readable parquet file ({_short(e)})", "re-export the file") from None


def _load_hub(name: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"cannot load dataset {name!r}: the datasets package is not installed",
            "pip install datasets, or use a local .jsonl file",
        ) from None
    try:
        return datasets.load_dataset(name, split=split).to_list()
    except Exception as e:  # network, missing repo, bad split, gated dataset: all the user's to fix
        raise DataError(
            f"could not load dataset {name!r} (split {split!r}): {_short(e)}",
            "check the name and split, your network and login, or use a local .jsonl/.json/.csv/.parquet file",
        ) from None


def _short(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= 200 else text[:197] + "..."


# ---------------------------------------------------------------- formats


def detect_format(rows: list[dict]) -> str:
    """The format the columns of the first row match; a DataError listing them if none does."""
    if not rows:
        raise DataError("the dataset has no rows", "add examples to it")
    cols = set(rows[0])
    # Token ids win over any text column beside them: they are what the text became.
    for fmt in ("tokenized", "messages", "prompt_completion", "alpaca", "text"):
        if set(REQUIRED[fmt]) <= cols:
            return fmt
    raise DataError(
        f"cannot tell the data format from the columns {_cols(cols)}",
        "use columns prompt+completion, instruction(+input)+output, messages, text, "
        "or input_ids (+labels) for pre-tokenized rows",
    )


def _check_format(rows: list[dict], fmt: str) -> str:
    if fmt == "auto":
        return detect_format(rows)
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}", f"use one of auto, {', '.join(FORMATS)}")
    cols = set(rows[0]) if rows else set()
    missing = [c for c in REQUIRED[fmt] if c not in cols]
    if missing:
        raise DataError(
            f"data.format={fmt} needs column(s) {', '.join(missing)} but the data has {_cols(cols)}",
            "rename the columns, or set data.format=auto to detect the format",
        )
    return fmt


def _cols(cols: set[str]) -> str:
    return ", ".join(sorted(map(str, cols))) or "none"


def _field(row: dict, key: str, index: int, optional: bool = False) -> str:
    value = row.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        what = "is missing" if key not in row else f"is {type(value).__name__}, not text"
        raise DataError(f"row {index + 1}: column {key!r} {what}", "give every row a text value there")
    return value


def _messages(value: Any, index: int) -> list[dict]:
    ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        )
    )
    if not ok:
        raise DataError(
            f"row {index + 1}: 'messages' is not a list of {{role, content}} objects",
            'write messages as [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]',
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


# ---------------------------------------------------------------- tokenizing


def tokenize_rows(
    rows: Sequence[dict], fmt: str, tokenizer: Any, max_length: int, completion_only_loss: bool
) -> tuple[list[dict], int]:
    """Examples ``{"input_ids", "labels"}`` truncated to ``max_length``, and how many were dropped
    because no target token survived (after the causal shift)."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}", f"use one of auto, {', '.join(FORMATS)}")
    pairs: list[tuple[list[int], list[int]]] = []
    if fmt == "tokenized":
        pairs = [_token_row(row, i) for i, row in enumerate(rows)]
        return _truncate(pairs, max_length)
    bos = _bos(tokenizer)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt == "messages":
        renderer = _ChatRenderer(tokenizer)
        for i, row in enumerate(rows):
            ids, mask = renderer.encode(_messages(row.get("messages"), i))
            labels = [
                t if (m or not completion_only_loss) else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)
            ]
            pairs.append((ids, labels))
    else:
        if fmt == "text":
            prompts = ["" for _ in rows]
            answers = [_field(r, "text", i) for i, r in enumerate(rows)]
            completion_only_loss = False
        elif fmt == "prompt_completion":
            prompts = [_field(r, "prompt", i) for i, r in enumerate(rows)]
            answers = [_field(r, "completion", i) for i, r in enumerate(rows)]
        else:
            prompts = [_alpaca_prompt(r, i) for i, r in enumerate(rows)]
            answers = [_field(r, "output", i) for i, r in enumerate(rows)]
        p_ids = _encode(tokenizer, prompts)
        a_ids = _encode(tokenizer, answers)
        for p, a in zip(p_ids, a_ids, strict=True):
            prompt, answer = bos + p, a + eos
            masked = [IGNORE_INDEX] * len(prompt) if completion_only_loss else prompt
            pairs.append((prompt + answer, masked + answer))
    return _truncate(pairs, max_length)


def _truncate(pairs: list[tuple[list[int], list[int]]], max_length: int) -> tuple[list[dict], int]:
    examples, dropped = [], 0
    for ids, labels in pairs:
        ids, labels = ids[:max_length], labels[:max_length]
        if all(x == IGNORE_INDEX for x in labels[1:]):
            dropped += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
    return examples, dropped


def _int_list(value: Any, index: int, key: str) -> list[int]:
    if isinstance(value, str):  # a CSV cell holds the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if hasattr(value, "tolist"):  # numpy arrays from parquet readers
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    ):
        raise DataError(
            f"row {index + 1}: {key!r} is not a list of whole numbers",
            f'write {key} as token ids, e.g. "{key}": [1, 345, 27]',
        )
    return list(value)


def _token_row(row: dict, index: int) -> tuple[list[int], list[int]]:
    """A pre-tokenized row: ``input_ids`` and optional ``labels`` (all ids are targets without them)."""
    ids = _int_list(row.get("input_ids"), index, "input_ids")
    if not ids:
        raise DataError(f"row {index + 1}: 'input_ids' is empty", "give every row at least two token ids")
    if any(t < 0 for t in ids):
        raise DataError(f"row {index + 1}: 'input_ids' holds a negative id", "token ids are >= 0")
    if row.get("labels") is None:
        return ids, list(ids)
    labels = _int_list(row["labels"], index, "labels")
    if len(labels) != len(ids):
        raise DataError(
            f"row {index + 1}: 'labels' has {len(labels)} entries for {len(ids)} input_ids",
            f"give one label per token, {IGNORE_INDEX} where no loss is taken (labels are not shifted)",
        )
    if any(t < 0 and t != IGNORE_INDEX for t in labels):
        raise DataError(
            f"row {index + 1}: 'labels' holds a negative id other than {IGNORE_INDEX}",
            f"use {IGNORE_INDEX} for tokens without loss",
        )
    return ids, labels


def _alpaca_prompt(row: dict, index: int) -> str:
    instruction = _field(row, "instruction", index)
    extra = _field(row, "input", index, optional=True)
    if extra.strip():
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=extra)
    return ALPACA_PROMPT.format(instruction=instruction)


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # One batched call: a fast tokenizer then works in parallel, which matters for hub-sized data.
    if not texts:
        return []
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _bos(tokenizer: Any) -> list[int]:
    """``[bos]`` when the tokenizer puts one in front of plain text by itself, else ``[]``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


# Used when a tokenizer has no chat template; the same shape as builtin:tiny's.
def _fallback_render(messages: list[dict], eos: str, add_generation_prompt: bool) -> str:
    out = []
    for m in messages:
        out.append(f"<|{m['role']}|>\n{m['content']}" + (eos if m["role"] == "assistant" else "") + "\n")
    if add_generation_prompt:
        out.append("<|assistant|>\n")
    return "".join(out)


class _ChatRenderer:
    """Renders a conversation and marks which tokens belong to assistant turns.

    A turn's targets are the text that rendering it adds after the generation prompt of the
    conversation so far (its content plus the template's end-of-turn marker). This works with any
    template that renders prefixes as prefixes; otherwise the content is located by search.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token or ""

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            return _fallback_render(messages, self.eos, add_generation_prompt)
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # jinja raise_exception(): e.g. roles that must alternate
            raise DataError(
                f"the chat template refused a conversation: {_short(e)}",
                "fix the roles/order of the messages, or use the prompt/completion format",
            ) from None

    def _prefix_len(self, full: str, messages: list[dict], gen: bool) -> int | None:
        try:
            text = self.render(messages, add_generation_prompt=gen)
        except DataError:
            return None
        return len(text) if full.startswith(text) else None

    def spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        full = self.render(messages)
        spans, cursor = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = self._prefix_len(full, messages[:i], gen=True) if i else None
            end = self._prefix_len(full, messages[: i + 1], gen=False)
            if start is None or end is None or not cursor <= start < end:
                found = full.find(m["content"], cursor)
                if found < 0:
                    continue  # the template dropped this turn's text: nothing to learn from it
                start, end = found, found + len(m["content"])
                if self.eos and full.startswith(self.eos, end):
                    end += len(self.eos)
            spans.append((start, end))
            cursor = end
        return full, spans

    def encode(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        full, spans = self.spans(messages)
        try:
            enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        except (NotImplementedError, ValueError, TypeError):
            enc = None
        if enc is not None and "offset_mapping" in enc:
            ids = list(enc["input_ids"])
            mask = [any(s < e_ and e > s_ for s_, e_ in spans) for s, e in enc["offset_mapping"]]
            return ids, mask
        # Slow tokenizers have no offsets: tokenize the pieces between span edges one by one.
        ids, mask, pos = [], [], 0
        for s, e in [*spans, (len(full), len(full))]:
            for text, target in ((full[pos:s], False), (full[s:e], True)):
                piece = _encode(self.tokenizer, [text])[0] if text else []
                ids += piece
                mask += [target] * len(piece)
            pos = e
        return ids, mask


def prompt_ids(tokenizer: Any, fmt: str, prompt: str) -> list[int]:
    """A sampling prompt as token ids, laid out as the training examples of format ``fmt`` lay out
    theirs up to where the answer starts, so a sample shows what the model learnt to do after it:
    one user turn and the generation prompt for ``messages``, the Alpaca layout for ``alpaca``, the
    text as typed (after BOS where the training text has one) otherwise. A prompt typed in the
    layout already is left as it is."""
    if fmt == "messages":
        renderer = _ChatRenderer(tokenizer)
        marker = "\x00"
        lead = renderer.render([{"role": "user", "content": marker}], add_generation_prompt=True).split(
            marker
        )[0]
        if not (lead.strip() and prompt.startswith(lead.strip())):
            prompt = renderer.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return _encode(tokenizer, [prompt])[0]
    if fmt == "alpaca" and not prompt.startswith("### Instruction:"):
        prompt = ALPACA_PROMPT.format(instruction=prompt)
    return _bos(tokenizer) + _encode(tokenizer, [prompt])[0]


# ---------------------------------------------------------------- the whole pipeline


def load_examples(cfg: DataConfig, tokenizer: Any, seed: int) -> Splits:
    """Load, detect (or check the forced) format, tokenize, and split off the eval examples."""
    rows = load_rows(cfg.path, cfg.split)
    fmt = _check_format(rows, cfg.format)
    examples, dropped = tokenize_rows(rows, fmt, tokenizer, cfg.max_length, cfg.completion_only_loss)
    if not examples:
        raise DataError(
            f"all {len(rows)} examples were dropped: every example is longer than max_length={cfg.max_length} "
            "tokens before its answer starts",
            "raise data.max_length, or shorten the prompts",
        )
    n = len(examples)
    k = 0
    if cfg.eval_fraction > 0 and n >= 2:
        k = min(max(1, round(n * cfg.eval_fraction)), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:k])
    # Both splits keep file order; the trainer shuffles the train split per epoch itself.
    train = [ex for i, ex in enumerate(examples) if i not in held]
    evals = [ex for i, ex in enumerate(examples) if i in held]
    return Splits(train=train, eval=evals, format=fmt, dropped=dropped)


def collate(examples: list[dict], pad_token_id: int, packing: bool = False) -> dict[str, torch.Tensor]:
    """A batch of tensors.

    Unpacked: right-padded ``input_ids``, ``attention_mask``, ``labels`` of shape [B, L].
    Packed: one row of all examples end to end with ``position_ids`` restarting at 0 per example
    and no attention mask; transformers then builds a block-diagonal causal mask. That detection
    is skipped when the model runs with a KV cache, so call the model with ``use_cache=False``.
    """
    if packing:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for ex in examples:
            ids += ex["input_ids"]
            # The shifted loss would otherwise train example i's last token to predict i+1's first.
            labels += [IGNORE_INDEX, *ex["labels"][1:]]
            pos += range(len(ex["input_ids"]))
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([pos], dtype=torch.long),
        }
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


def count_targets(batch: dict) -> int:
    """Label tokens that count in the loss once the model shifts labels by one."""
    return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())


def preview(path: str, n: int = 5) -> tuple[str, list[dict], int]:
    """(format, first ``n`` raw rows, total rows) for the dataset picker."""
    rows = load_rows(path)
    return detect_format(rows), rows[:n], len(rows)
