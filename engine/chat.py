"""Chat conversations: the roles a row may use, and rendering with the tokenizer's template while
marking which tokens belong to assistant turns."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from tunedeck.engine.data_files import short
from tunedeck.engine.errors import DataError

ROLES = ("system", "user", "assistant")


def allowed_roles(tokenizer: Any) -> tuple[str, ...]:
    """system, user and assistant, and tool where the chat template names it (it then renders tool turns)."""
    template = getattr(tokenizer, "chat_template", None)
    return (*ROLES, "tool") if template and "tool" in str(template) else ROLES


def check_messages(value: Any, at: str, roles: Sequence[str], need_assistant: bool) -> list[dict[str, str]]:
    """A conversation as ``[{"role", "content"}]``, or a DataError naming the row (``at``) and the fix."""
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
            f"{at}: 'messages' is not a list of {{role, content}} objects",
            'write messages as [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]',
        )
    for j, m in enumerate(value, start=1):
        if m["role"] not in roles:
            close = difflib.get_close_matches(m["role"], roles, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise DataError(
                f"{at}: message {j} has the unknown role {m['role']!r}",
                f"{hint}use one of {', '.join(roles)}",
            )
    if need_assistant and not any(m["role"] == "assistant" for m in value):
        present = ", ".join(dict.fromkeys(m["role"] for m in value))
        raise DataError(
            f"{at}: no message has the role 'assistant' (roles: {present}), so it has nothing to learn",
            "add the assistant's reply, or set data.completion_only_loss=false to train on every token",
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


# Used when a tokenizer has no chat template; the same shape as builtin:tiny's.
def _fallback_render(messages: list[dict], eos: str, add_generation_prompt: bool) -> str:
    out = []
    for m in messages:
        out.append(f"<|{m['role']}|>\n{m['content']}" + (eos if m["role"] == "assistant" else "") + "\n")
    if add_generation_prompt:
        out.append("<|assistant|>\n")
    return "".join(out)


class ChatRenderer:
    """Renders a conversation and marks which tokens belong to assistant turns.

    A turn's targets are the text that rendering it adds after the generation prompt of the
    conversation so far (its content plus the template's end-of-turn marker). This works with any
    template that renders prefixes as prefixes; otherwise the content is located by search.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token or ""

    def render(self, messages: list[dict], add_generation_prompt: bool = False, at: str = "") -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            return _fallback_render(messages, self.eos, add_generation_prompt)
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # jinja raise_exception(): e.g. roles that must alternate
            raise DataError(
                f"{at + ': ' if at else ''}the chat template refused the conversation: {short(e)}",
                "fix the roles/order of the messages, or use the prompt/completion format",
            ) from None

    def _prefix_len(self, full: str, messages: list[dict], gen: bool) -> int | None:
        try:
            text = self.render(messages, add_generation_prompt=gen)
        except DataError:
            return None
        return len(text) if full.startswith(text) else None

    def spans(self, messages: list[dict], at: str = "") -> tuple[str, list[tuple[int, int]]]:
        full = self.render(messages, at=at)
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

    def encode(self, messages: list[dict], max_length: int, at: str = "") -> tuple[list[int], list[bool]]:
        """Token ids of the conversation, cut to ``max_length``, and which of them are targets."""
        full, spans = self.spans(messages, at)
        try:
            enc = self.tokenizer(
                full,
                add_special_tokens=False,
                return_offsets_mapping=True,
                truncation=True,
                max_length=max_length,
            )
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
                if text and len(ids) < max_length:
                    piece = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                    ids += piece
                    mask += [target] * len(piece)
            pos = e
        return ids[:max_length], mask[:max_length]
