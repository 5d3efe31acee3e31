"""The five row layouts, checking a row against its layout, and turning rows into token ids and labels.

Prompt/completion, alpaca, chat messages, plain text, and rows that are already token ids; each
becomes ``{"input_ids", "labels"}`` with ``IGNORE_INDEX`` where no loss is taken. Texts are cut to
``max_length`` tokens as they are tokenized, so a long text never becomes a long list. Every bad
row is a ``DataError`` that names it (``at``: ``row N``) and says how to fix it.

Labels are *unshifted* (HF convention): the model predicts ``labels[t]`` from tokens ``< t``, so
the label at position 0 never counts. The drop rule follows that.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunedeck.engine.chat import ChatRenderer, allowed_roles, check_messages
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
# The columns a checked row of each format has (alpaca's input is "" where a row has none).
COLUMNS = {**REQUIRED, "alpaca": ("instruction", "input", "output"), "tokenized": ("input_ids", "labels")}
# The short Alpaca layout: the long preamble of the original costs tokens and teaches nothing.
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"

Example = dict[str, list[int]]
# Characters of text per tokenizer call: bounds the tokens (and their offsets, strings...) held at once.
ENCODE_CHARS = 4_000_000


def detect_format(rows: Sequence[dict]) -> str:
    """The format the columns of the first row match; a DataError listing them if none does."""
    if not rows:
        raise DataError("the dataset has no rows", "add examples to it")
    return format_of(rows[0])


def format_of(columns: Sequence[str] | dict) -> str:
    """The format these columns match; a DataError listing them if none does."""
    cols = set(columns)
    # Token ids win over any text column beside them: they are what the text became.
    for fmt in ("tokenized", "messages", "prompt_completion", "alpaca", "text"):
        if set(REQUIRED[fmt]) <= cols:
            return fmt
    raise DataError(
        f"cannot tell the data format from the columns {_cols(cols)}",
        "use columns prompt+completion, instruction(+input)+output, messages, text, "
        "or input_ids (+labels) for pre-tokenized rows",
    )


def check_format(columns: Sequence[str] | dict, fmt: str) -> str:
    """``fmt`` resolved against the columns of the first row: detected for ``auto``, else checked."""
    if fmt == "auto":
        return format_of(columns)
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}", f"use one of auto, {', '.join(FORMATS)}")
    cols = set(columns)
    missing = [c for c in REQUIRED[fmt] if c not in cols]
    if missing:
        raise DataError(
            f"data.format={fmt} needs column(s) {', '.join(missing)} but the data has {_cols(cols)}",
            "rename the columns, or set data.format=auto to detect the format",
        )
    return fmt


def _cols(cols: set[str]) -> str:
    return ", ".join(sorted(map(str, cols))) or "none"


# ---------------------------------------------------------------- checking rows


@dataclass(frozen=True)
class Rules:
    """What a row of a format must hold beyond its columns: the chat roles, whether a turn must teach."""

    roles: tuple[str, ...]
    completion_only_loss: bool

    @classmethod
    def of(cls, tokenizer: Any, completion_only_loss: bool) -> Rules:
        return cls(roles=allowed_roles(tokenizer), completion_only_loss=completion_only_loss)


def check_row(row: dict, fmt: str, at: str, rules: Rules) -> dict[str, Any]:
    """The row reduced to the columns of ``fmt``, with the types tokenizing needs; a DataError otherwise."""
    if fmt == "prompt_completion":
        return {"prompt": _field(row, "prompt", at), "completion": _field(row, "completion", at)}
    if fmt == "alpaca":
        return {
            "instruction": _field(row, "instruction", at),
            "input": _field(row, "input", at, optional=True),
            "output": _field(row, "output", at),
        }
    if fmt == "text":
        return {"text": _field(row, "text", at)}
    if fmt == "messages":
        need = rules.completion_only_loss
        return {"messages": check_messages(row.get("messages"), at, rules.roles, need)}
    if fmt == "tokenized":
        ids, labels = _token_row(row, at)
        return {"input_ids": ids, "labels": labels}
    raise DataError(f"unknown data format {fmt!r}", f"use one of auto, {', '.join(FORMATS)}")


def _field(row: dict, key: str, at: str, optional: bool = False) -> str:
    value = row.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        what = "is missing" if key not in row else f"is {type(value).__name__}, not text"
        raise DataError(f"{at}: column {key!r} {what}", "give every row a text value there")
    return value


def _int_list(value: Any, at: str, key: str) -> list[int]:
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
            f"{at}: {key!r} is not a list of whole numbers",
            f'write {key} as token ids, e.g. "{key}": [1, 345, 27]',
        )
    return list(value)


def _token_row(row: dict, at: str) -> tuple[list[int], list[int]]:
    """A pre-tokenized row: ``input_ids`` and optional ``labels`` (all ids are targets without them)."""
    ids = _int_list(row.get("input_ids"), at, "input_ids")
    if not ids:
        raise DataError(f"{at}: 'input_ids' is empty", "give every row at least two token ids")
    if any(t < 0 for t in ids):
        raise DataError(f"{at}: 'input_ids' holds a negative id", "token ids are >= 0")
    if row.get("labels") is None:
        return ids, list(ids)
    labels = _int_list(row["labels"], at, "labels")
    if len(labels) != len(ids):
        raise DataError(
            f"{at}: 'labels' has {len(labels)} entries for {len(ids)} input_ids",
            f"give one label per token, {IGNORE_INDEX} where no loss is taken (labels are not shifted)",
        )
    if any(t < 0 and t != IGNORE_INDEX for t in labels):
        raise DataError(
            f"{at}: 'labels' holds a negative id other than {IGNORE_INDEX}",
            f"use {IGNORE_INDEX} for tokens without loss",
        )
    return ids, labels


# ---------------------------------------------------------------- tokenizing


class Tokenize:
    """Checked rows of one format in, examples cut to ``max_length`` out (and how many were dropped
    because no target token survived the cut, after the causal shift)."""

    def __init__(self, fmt: str, tokenizer: Any, max_length: int, completion_only_loss: bool) -> None:
        if fmt not in FORMATS:
            raise DataError(f"unknown data format {fmt!r}", f"use one of auto, {', '.join(FORMATS)}")
        self.fmt, self.tokenizer, self.max_length = fmt, tokenizer, max_length
        self.completion_only_loss = completion_only_loss and fmt != "text"
        self.rules = Rules.of(tokenizer, completion_only_loss)
        if fmt in ("prompt_completion", "alpaca", "text"):
            self.bos = bos_ids(tokenizer)
            self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        if fmt == "messages":
            self.renderer = ChatRenderer(tokenizer)

    def __call__(self, rows: Sequence[dict], where: Sequence[str]) -> tuple[list[Example], int]:
        """``rows`` checked already (``check_row``); ``where[i]`` names row i in errors."""
        pairs: list[tuple[list[int], list[int]]] = []
        if self.fmt == "tokenized":
            pairs = [(r["input_ids"][: self.max_length], r["labels"][: self.max_length]) for r in rows]
        elif self.fmt == "messages":
            for r, at in zip(rows, where, strict=True):
                ids, mask = self.renderer.encode(r["messages"], self.max_length, at)
                only = self.completion_only_loss
                pairs.append(
                    (ids, [t if (m or not only) else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)])
                )
        else:
            if self.fmt == "text":
                prompts = [""] * len(rows)
                answers = [r["text"] for r in rows]
            elif self.fmt == "prompt_completion":
                prompts = [r["prompt"] for r in rows]
                answers = [r["completion"] for r in rows]
            else:
                prompts = [alpaca_prompt(r["instruction"], r["input"]) for r in rows]
                answers = [r["output"] for r in rows]
            # The cut of each part at max_length leaves the same first max_length tokens of the whole.
            p_ids = encode(self.tokenizer, prompts, self.max_length)
            a_ids = encode(self.tokenizer, answers, self.max_length)
            cut = self.max_length
            for p, a in zip(p_ids, a_ids, strict=True):
                prompt = (self.bos + p)[:cut]
                room = cut - len(prompt)
                answer = a[:room]
                answer += self.eos[: room - len(answer)]
                masked = [IGNORE_INDEX] * len(prompt) if self.completion_only_loss else prompt
                pairs.append((prompt + answer, masked + answer))
        examples = []
        for ids, labels in pairs:
            # A target after position 0 (list.count runs in C; this is per token of the whole dataset).
            if labels[1:].count(IGNORE_INDEX) < len(labels) - 1:
                examples.append({"input_ids": ids, "labels": labels})
        return examples, len(pairs) - len(examples)


def tokenize_rows(
    rows: Sequence[dict], fmt: str, tokenizer: Any, max_length: int, completion_only_loss: bool
) -> tuple[list[Example], int]:
    """Examples ``{"input_ids", "labels"}`` of raw rows, truncated to ``max_length``, and how many were
    dropped because no target token survived (after the causal shift)."""
    tokenize = Tokenize(fmt, tokenizer, max_length, completion_only_loss)
    where = [f"row {i + 1}" for i in range(len(rows))]
    checked = [check_row(r, fmt, at, tokenize.rules) for r, at in zip(rows, where, strict=True)]
    return tokenize(checked, where)


def alpaca_prompt(instruction: str, extra: str) -> str:
    if extra.strip():
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=extra)
    return ALPACA_PROMPT.format(instruction=instruction)


def encode(tokenizer: Any, texts: list[str], max_length: int | None = None) -> list[list[int]]:
    """Token ids of each text without special tokens, cut to ``max_length`` by the tokenizer.

    Batched calls (a fast tokenizer then works in parallel), of a few MB of text each, so a batch
    of long texts never has all their tokens in memory at once."""
    cut = {"truncation": True, "max_length": max_length} if max_length is not None else {}
    out: list[list[int]] = []
    start = 0
    while start < len(texts):
        end, size = start, 0
        while end < len(texts) and (end == start or size + len(texts[end]) <= ENCODE_CHARS):
            size += len(texts[end])
            end += 1
        ids = tokenizer(texts[start:end], add_special_tokens=False, return_attention_mask=False, **cut)
        out += ids["input_ids"]
        start = end
    return out


def bos_ids(tokenizer: Any) -> list[int]:
    """``[bos]`` when the tokenizer puts one in front of plain text by itself, else ``[]``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def prompt_ids(tokenizer: Any, fmt: str, prompt: str) -> list[int]:
    """A sampling prompt as token ids, laid out as the training examples of format ``fmt`` lay out
    theirs up to where the answer starts, so a sample shows what the model learnt to do after it:
    one user turn and the generation prompt for ``messages``, the Alpaca layout for ``alpaca``, the
    text as typed (after BOS where the training text has one) otherwise. A prompt typed in the
    layout already is left as it is."""
    if fmt == "messages":
        renderer = ChatRenderer(tokenizer)
        marker = "\x00"
        lead = renderer.render([{"role": "user", "content": marker}], add_generation_prompt=True).split(
            marker
        )[0]
        if not (lead.strip() and prompt.startswith(lead.strip())):
            prompt = renderer.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return encode(tokenizer, [prompt])[0]
    if fmt == "alpaca" and not prompt.startswith("### Instruction:"):
        prompt = ALPACA_PROMPT.format(instruction=prompt)
    return bos_ids(tokenizer) + encode(tokenizer, [prompt])[0]
