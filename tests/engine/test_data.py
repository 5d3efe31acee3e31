"""engine.data: loading, format detection, masking, truncation, splits, batching and packing."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch

from tunedeck.engine import builtin, packing
from tunedeck.engine.config import DataConfig
from tunedeck.engine.data import (
    IGNORE_INDEX,
    collate,
    count_targets,
    detect_format,
    load_examples,
    load_rows,
    preview,
    prompt_ids,
    tokenize_rows,
)
from tunedeck.engine.errors import DataError
from tunedeck.engine.packing import CU_K, CU_Q, MAX_K, MAX_Q

X = IGNORE_INDEX
EOS = 1


@pytest.fixture(scope="module")
def tok():
    return builtin.build_tokenizer()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


PC = [{"prompt": f"Q{i}: ", "completion": f"answer {i}"} for i in range(20)]


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"instruction": "a", "output": "b"}, "alpaca"),
        ({"messages": [{"role": "user", "content": "a"}]}, "messages"),
        ({"text": "abc", "meta": 1}, "text"),
    ],
)
def test_detect_format(row, fmt):
    assert detect_format([row]) == fmt


def test_detect_format_unknown_columns_names_them():
    with pytest.raises(DataError, match=r"cannot tell the data format from the columns answer, question"):
        detect_format([{"question": "a", "answer": "b"}])


def test_prompt_completion_masks_prompt(tok):
    assert ids(tok, "abc") == [67, 68, 69]  # byte-level: one token per byte
    out, dropped = tokenize_rows([{"prompt": "ab", "completion": "c"}], "prompt_completion", tok, 64, True)
    assert dropped == 0
    assert out == [{"input_ids": [67, 68, 69, EOS], "labels": [X, X, 69, EOS]}]


def test_prompt_completion_without_completion_only_loss(tok):
    out, _ = tokenize_rows([{"prompt": "ab", "completion": "c"}], "prompt_completion", tok, 64, False)
    assert out[0]["labels"] == out[0]["input_ids"] == [67, 68, 69, EOS]


def test_alpaca_prompt_and_masking(tok):
    rows = [
        {"instruction": "Add", "input": "1 2", "output": "3"},
        {"instruction": "Hi", "input": None, "output": "yo"},
    ]
    out, _ = tokenize_rows(rows, "alpaca", tok, 256, True)
    first = out[0]
    n_prompt = sum(1 for x in first["labels"] if x == X)
    assert (
        tok.decode(first["input_ids"][:n_prompt])
        == "### Instruction:\nAdd\n\n### Input:\n1 2\n\n### Response:\n"
    )
    assert first["labels"][n_prompt:] == ids(tok, "3") + [EOS]
    second = out[1]
    assert tok.decode(second["input_ids"]) == "### Instruction:\nHi\n\n### Response:\nyo</s>"
    assert [x for x in second["labels"] if x != X] == ids(tok, "yo") + [EOS]


def test_text_format_all_targets(tok):
    out, _ = tokenize_rows([{"text": "hello"}], "text", tok, 64, True)
    assert out[0]["input_ids"] == out[0]["labels"] == ids(tok, "hello") + [EOS]


CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "2+2"},
    {"role": "assistant", "content": "4"},
]


def test_messages_masking_keeps_only_assistant_turns(tok):
    out, _ = tokenize_rows([{"messages": CHAT}], "messages", tok, 256, True)
    ex = out[0]
    assert ex["input_ids"] == list(tok.apply_chat_template(CHAT, tokenize=True)["input_ids"])
    targets = [t for t in ex["labels"] if t != X]
    # each assistant turn: its content, eos and the template's newline after it
    assert targets == ids(tok, "yo") + [EOS] + ids(tok, "\n") + ids(tok, "4") + [EOS] + ids(tok, "\n")
    n_pre = len(ids(tok, "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"))
    assert ex["labels"][:n_pre] == [X] * n_pre
    assert ex["labels"][n_pre : n_pre + 4] == [91, 81, EOS, 201]

    full, _ = tokenize_rows([{"messages": CHAT}], "messages", tok, 256, False)
    assert full[0]["labels"] == full[0]["input_ids"]


def test_messages_fallback_template_and_slow_tokenizer_path(tok):
    """No chat template: the plain fallback renders like builtin's. No offsets: same labels."""
    bare = builtin.build_tokenizer()
    bare.chat_template = None
    ref, _ = tokenize_rows([{"messages": CHAT}], "messages", tok, 256, True)
    out, _ = tokenize_rows([{"messages": CHAT}], "messages", bare, 256, True)
    assert out == ref

    class NoOffsets:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, text, **kw):
            if kw.get("return_offsets_mapping"):
                raise NotImplementedError
            return self.inner(text, **kw)

    out, _ = tokenize_rows([{"messages": CHAT}], "messages", NoOffsets(tok), 256, True)
    assert out == ref


@pytest.mark.parametrize(
    "messages", ["hi", [], [{"role": "user"}], [{"role": "user", "content": ["a", "b"]}], [["user", "hi"]]]
)
def test_messages_not_a_list_of_role_content(tok, messages):
    with pytest.raises(DataError, match=r"row 2: 'messages' is not a list of \{role, content\} objects"):
        tokenize_rows([{"messages": CHAT}, {"messages": messages}], "messages", tok, 64, True)


def test_bad_cell_names_row_and_column(tok):
    with pytest.raises(DataError, match=r"row 2: column 'completion' is int, not text"):
        tokenize_rows(
            [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 3}],
            "prompt_completion",
            tok,
            64,
            True,
        )


def test_truncation_and_dropped_count(tok):
    rows = [
        {"prompt": "abc", "completion": "defghij"},  # 3 + 7 + eos = 11 -> cut to 8, targets survive
        {"prompt": "abcdefgh", "completion": "x"},  # prompt fills max_length: no target left
        {"prompt": "abcdefg", "completion": "x"},  # the only target sits at position 7: still counts
        {"prompt": "", "completion": "x"},
    ]
    out, dropped = tokenize_rows(rows, "prompt_completion", tok, 8, True)
    assert dropped == 1
    assert [len(e["input_ids"]) for e in out] == [8, 8, 2]
    assert out[0]["input_ids"] == ids(tok, "abcdefgh")
    assert out[0]["labels"] == [X, X, X] + ids(tok, "defgh")
    assert out[1]["labels"] == [X] * 7 + ids(tok, "x")
    # a lone first-position target never counts (the model predicts position t from < t), but eos does
    assert out[2] == {"input_ids": ids(tok, "x") + [EOS], "labels": ids(tok, "x") + [EOS]}
    _, dropped = tokenize_rows([{"prompt": "", "completion": "x"}], "prompt_completion", tok, 1, True)
    assert dropped == 1


# ---------------------------------------------------------------- loading


def test_jsonl_json_csv_loading(tmp_path):
    rows = [{"prompt": 'a,"b"', "completion": "c\nd"}, {"prompt": "é", "completion": "f"}]
    (tmp_path / "d.jsonl").write_text("\n" + json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    assert load_rows(str(tmp_path / "d.jsonl")) == rows
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "obj.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("list.json", "obj.json", "lines.json"):
        assert load_rows(str(tmp_path / name)) == rows
    with (tmp_path / "d.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        w.writeheader()
        w.writerows(rows)
    assert load_rows(str(tmp_path / "d.csv")) == rows
    assert preview(str(tmp_path / "d.csv"), n=1) == ("prompt_completion", rows[:1], 2)


def test_parquet_loading(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [
        {"instruction": "a", "input": "", "output": "b"},
        {"instruction": "c", "input": "d", "output": "e"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert load_rows(str(tmp_path / "d.parquet")) == rows
    assert preview(str(tmp_path / "d.parquet"))[0] == "alpaca"


def test_hub_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake(name, split):
        calls.append((name, split))
        if name == "someone/missing":
            raise FileNotFoundError("Dataset 'someone/missing' doesn't exist on the Hub\nmore detail")
        return datasets.Dataset.from_list([{"text": "hello"}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_rows("someone/corpus", split="validation") == [{"text": "hello"}]
    assert calls == [("someone/corpus", "validation")]
    with pytest.raises(
        DataError,
        match=r"could not load dataset 'someone/missing' \(split 'train'\): Dataset "
        r"'someone/missing' doesn't exist on the Hub$",
    ) as e:
        load_rows("someone/missing")
    assert "local" in e.value.advice


def test_builtin_demo():
    path = builtin.DEMO_FILE
    assert path.stat().st_size < 400_000
    rows = load_rows("builtin:demo")
    assert len(rows) == 2000
    fmt, head, total = preview("builtin:demo", n=3)
    assert (fmt, total, head) == ("prompt_completion", 2000, rows[:3])
    assert max(len(r["prompt"]) + len(r["completion"]) for r in rows) < 60
    # the committed file is exactly what the generator makes
    spec = importlib.util.spec_from_file_location("make_demo", path.parent / "make_demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import random

    assert mod.examples(random.Random(mod.SEED)) == rows


# ---------------------------------------------------------------- errors


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=re.escape(f"dataset file {missing} does not exist")):
        load_rows(str(missing))
    with pytest.raises(DataError, match="does not exist"):
        load_rows("no_such_name")


def test_malformed_jsonl_line_number(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n')
    with pytest.raises(DataError, match=re.escape(f"{p}, line 3: malformed JSON")):
        load_rows(str(p))
    p.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"line 2: expected a JSON object, got list"):
        load_rows(str(p))
    q = tmp_path / "bad.json"
    q.write_text('[\n{"text": "a"},\n{"text": }\n]')
    with pytest.raises(DataError, match=r"bad.json, line 3: malformed JSON"):
        load_rows(str(q))


def test_unsupported_extension(tmp_path):
    p = tmp_path / "data.txt"
    p.write_text("hello")
    with pytest.raises(DataError, match=r"unsupported extension '.txt'") as e:
        load_rows(str(p))
    assert ".jsonl" in e.value.advice


def test_empty_dataset(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty.jsonl has no rows"):
        load_rows(str(p))


def test_unknown_and_forced_formats(tmp_path, tok):
    p = str(write_jsonl(tmp_path / "d.jsonl", PC))
    with pytest.raises(DataError, match=r"unknown data format 'chatml'"):
        load_examples(DataConfig(path=p, format="chatml"), tok, seed=0)
    with pytest.raises(
        DataError,
        match=r"data.format=alpaca needs column\(s\) instruction, output but the data "
        r"has completion, prompt",
    ) as e:
        load_examples(DataConfig(path=p, format="alpaca"), tok, seed=0)
    assert "data.format=auto" in e.value.advice
    forced = load_examples(DataConfig(path=p, format="prompt_completion"), tok, seed=0)
    assert forced.format == "prompt_completion"


def test_every_example_dropped(tmp_path, tok):
    p = str(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x" * 20, "completion": "y"}] * 3))
    with pytest.raises(
        DataError, match=r"all 3 examples were dropped: every example is longer than max_length=8"
    ) as e:
        load_examples(DataConfig(path=p, max_length=8), tok, seed=0)
    assert "raise data.max_length" in e.value.advice


# ---------------------------------------------------------------- splits


def test_eval_split_sizes_and_determinism(tmp_path, tok):
    p = str(write_jsonl(tmp_path / "d.jsonl", PC))
    a = load_examples(DataConfig(path=p, eval_fraction=0.1), tok, seed=7)
    b = load_examples(DataConfig(path=p, eval_fraction=0.1), tok, seed=7)
    c = load_examples(DataConfig(path=p, eval_fraction=0.1), tok, seed=8)
    assert (len(a.train), len(a.eval), a.format, a.dropped) == (18, 2, "prompt_completion", 0)
    assert a == b
    assert a.eval != c.eval
    everything = sorted(map(str, a.train + a.eval))
    assert everything == sorted(map(str, c.train + c.eval))
    assert len(load_examples(DataConfig(path=p, eval_fraction=0.0), tok, seed=7).eval) == 0
    # a small fraction still holds out one example; eval never takes the whole set
    assert len(load_examples(DataConfig(path=p, eval_fraction=0.01), tok, seed=7).eval) == 1
    two = str(write_jsonl(tmp_path / "two.jsonl", PC[:2]))
    s = load_examples(DataConfig(path=two, eval_fraction=0.9), tok, seed=7)
    assert (len(s.train), len(s.eval)) == (1, 1)
    one = str(write_jsonl(tmp_path / "one.jsonl", PC[:1]))
    s = load_examples(DataConfig(path=one, eval_fraction=0.5), tok, seed=7)
    assert (len(s.train), len(s.eval)) == (1, 0)


# ---------------------------------------------------------------- batching

EXAMPLES = [
    {"input_ids": [5, 6, 7], "labels": [X, 6, 7]},
    {"input_ids": [8, 9], "labels": [8, 9]},
    {"input_ids": [10, 11, 12, 13], "labels": [X, X, 12, 13]},
]


def test_collate_unpacked():
    b = collate(EXAMPLES, pad_token_id=2)
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (3, 4) for t in b.values())
    assert b["input_ids"].tolist() == [[5, 6, 7, 2], [8, 9, 2, 2], [10, 11, 12, 13]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert b["labels"].tolist() == [[X, 6, 7, X], [8, 9, X, X], [X, X, 12, 13]]
    assert count_targets(b) == 2 + 1 + 2


def test_collate_packed():
    b = collate(EXAMPLES, pad_token_id=2, packing=True)
    assert set(b) == {"input_ids", "labels", "position_ids", CU_Q, CU_K, MAX_Q, MAX_K}
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert b["labels"].tolist() == [[X, 6, 7, X, 9, X, X, 12, 13]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert all(b[k].dtype == torch.long for k in ("input_ids", "labels", "position_ids"))
    # The library's cumulative lengths are int32 and its longest lengths Python ints, as varlen kernels
    # take them; it makes two equal tensors for q and k, collate keeps one.
    assert b[CU_Q].dtype == torch.int32 and b[CU_Q].tolist() == [0, 3, 5, 9]
    assert b[CU_K] is b[CU_Q]
    assert type(b[MAX_Q]) is int and b[MAX_Q] == b[MAX_K] == 4
    assert count_targets(b) == count_targets(collate(EXAMPLES, pad_token_id=2)) == 5


def _packed_by_hand(examples):
    """What a packed batch must be: the examples end to end, each one's first label ignored (it would
    be predicted from the previous example's last token), positions from 0 per example."""
    ids, labels, pos, cu = [], [], [], [0]
    for ex in examples:
        ids += ex["input_ids"]
        labels += [X, *ex["labels"][1:]]
        pos += range(len(ex["input_ids"]))
        cu.append(cu[-1] + len(ex["input_ids"]))
    return [ids], [labels], [pos], cu, max(len(ex["input_ids"]) for ex in examples)


@pytest.mark.parametrize("lengths", [[1], [1, 1, 1], [7, 1, 3], [64], [2, 30, 5, 1, 9]])
def test_collate_packed_equals_the_packing_spelled_out(lengths):
    """transformers' DataCollatorWithFlattening gives what collate(packing=True) gave by hand,
    one-token examples (only an ignored label) included."""
    g = torch.Generator().manual_seed(sum(lengths))
    examples = []
    for n in lengths:
        ids = torch.randint(3, 259, (n,), generator=g).tolist()
        labels = [t if torch.rand((), generator=g) < 0.7 else X for t in ids]
        examples.append({"input_ids": ids, "labels": labels})
    b = collate(examples, pad_token_id=2, packing=True)
    ids, labels, pos, cu, longest = _packed_by_hand(examples)
    assert b["input_ids"].tolist() == ids and b["labels"].tolist() == labels
    assert b["position_ids"].tolist() == pos
    assert b[CU_Q].tolist() == cu and b[MAX_Q] == longest
    # the cumulative lengths agree with those derived from the position ids (attention's fallback)
    assert packing.cu_seqlens(b["position_ids"])[0].tolist() == cu


def test_prepare_batch_keeps_the_lengths_only_for_padding_free_attention():
    b = collate(EXAMPLES, pad_token_id=2, packing=True)
    assert set(packing.prepare_batch(b, varlen=False)) == {"input_ids", "labels", "position_ids"}
    kept = packing.prepare_batch(b, varlen=True)
    assert kept[CU_Q].tolist() == [0, 3, 5, 9] and kept[MAX_K] == 4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    if os.environ.get("TUNEDECK_CACHE"):
        return builtin.tiny_model_dir()
    os.environ["TUNEDECK_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        return builtin.tiny_model_dir()
    finally:
        del os.environ["TUNEDECK_CACHE"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked(tiny_dir, tok, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_dir, dtype=torch.float32, attn_implementation=attn
    ).eval()
    rows = load_rows("builtin:demo")[:5]
    examples, _ = tokenize_rows(rows, "prompt_completion", tok, 64, True)
    chat, _ = tokenize_rows([{"messages": CHAT}], "messages", tok, 64, True)
    examples += chat
    plain, packed = collate(examples, tok.pad_token_id), collate(examples, tok.pad_token_id, packing=True)
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        # use_cache=False: with a cache transformers skips packed-sequence detection
        out_u = model(**plain, use_cache=False)
        out_p = model(**packed, use_cache=False)
    per_u, per_p, start = [], [], 0
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        per_u.append(ce(out_u.logits[i, : n - 1], plain["labels"][i, 1:n], reduction="sum"))
        seg = out_p.logits[0, start : start + n]
        per_p.append(ce(seg[:-1], packed["labels"][0, start + 1 : start + n], reduction="sum"))
        # block-diagonal mask: each packed example sees only itself
        assert torch.allclose(seg, out_u.logits[i, :n], atol=1e-5, rtol=1e-5)
        start += n
    per_u, per_p = torch.stack(per_u), torch.stack(per_p)
    rel = ((per_p - per_u).abs() / per_u.abs()).max().item()
    print(f"{attn}: max relative difference of per-example summed CE, packed vs unpacked: {rel:.2e}")
    assert rel < 1e-5
    # HF's own loss is a mean over counted targets; times count_targets it is the same sum both ways
    total_u = out_u.loss * count_targets(plain)
    total_p = out_p.loss * count_targets(packed)
    assert torch.allclose(total_u, per_u.sum(), rtol=1e-5)
    assert torch.allclose(total_p, total_u, rtol=1e-5)


def test_load_examples_on_demo(tok):
    s = load_examples(DataConfig(), tok, seed=42)
    assert (len(s.train), len(s.eval), s.format, s.dropped) == (1900, 100, "prompt_completion", 0)
    ex = s.train[0]
    assert ex["input_ids"][-1] == EOS and ex["labels"][0] == X


# ---------------------------------------------------------------- pre-tokenized rows


def test_tokenized_rows_are_detected_and_kept_as_given(tmp_path, tok):
    rows = [
        {"input_ids": [5, 6, 7, 8], "labels": [X, X, 7, 8], "text": "ignored beside token ids"},
        {"input_ids": [9, 10, 11]},  # no labels: every token is a target
        {"input_ids": list(range(3, 23)), "labels": list(range(3, 23))},  # cut to max_length
        {"input_ids": [4, 5], "labels": [4, X]},  # no target left after the shift: dropped
    ]
    assert detect_format(rows) == "tokenized"
    p = write_jsonl(tmp_path / "tok.jsonl", rows)
    s = load_examples(DataConfig(path=str(p), max_length=8, eval_fraction=0.0), tok, seed=0)
    assert (s.format, s.dropped) == ("tokenized", 1)
    assert s.train == [
        {"input_ids": [5, 6, 7, 8], "labels": [X, X, 7, 8]},
        {"input_ids": [9, 10, 11], "labels": [9, 10, 11]},
        {"input_ids": list(range(3, 11)), "labels": list(range(3, 11))},
    ]
    forced = load_examples(
        DataConfig(path=str(p), format="tokenized", max_length=8, eval_fraction=0.0), tok, seed=0
    )
    assert forced.train == s.train


def test_tokenized_rows_from_csv_cells(tmp_path, tok):
    p = tmp_path / "tok.csv"
    p.write_text('input_ids,labels\n"[5, 6, 7]","[-100, 6, 7]"\n', encoding="utf-8")
    s = load_examples(DataConfig(path=str(p), eval_fraction=0.0), tok, seed=0)
    assert s.train == [{"input_ids": [5, 6, 7], "labels": [X, 6, 7]}]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"input_ids": [1, 2], "labels": [1]}, r"row 1: 'labels' has 1 entries for 2 input_ids"),
        ({"input_ids": ["a", "b"]}, r"row 1: 'input_ids' is not a list of whole numbers"),
        ({"input_ids": [1, True]}, r"row 1: 'input_ids' is not a list of whole numbers"),
        ({"input_ids": [1, -2]}, r"row 1: 'input_ids' holds a negative id"),
        ({"input_ids": []}, r"row 1: 'input_ids' is empty"),
        ({"input_ids": [1, 2], "labels": [1, -5]}, r"row 1: 'labels' holds a negative id other than -100"),
    ],
)
def test_tokenized_rows_refuse_bad_values(tok, row, message):
    with pytest.raises(DataError, match=message):
        tokenize_rows([row], "tokenized", tok, 16, True)


def test_tokenized_is_a_config_choice():
    from tunedeck.engine import config as config_mod

    assert config_mod.from_dict({"data": {"format": "tokenized"}}).data.format == "tokenized"


def test_tokenized_rows_pack_like_any_other(tok):
    examples, _ = tokenize_rows(
        [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [X, 9]}], "tokenized", tok, 16, True
    )
    b = collate(examples, pad_token_id=2, packing=True)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert b["labels"].tolist() == [[X, 6, 7, X, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert count_targets(b) == 3


# ---------------------------------------------------------------- sampling prompts


@pytest.mark.parametrize(
    "fmt, row",
    [
        (
            "messages",
            {
                "messages": [
                    {"role": "user", "content": "Capital of France?"},
                    {"role": "assistant", "content": "Paris"},
                ]
            },
        ),
        ("alpaca", {"instruction": "Capital of France?", "output": "Paris"}),
        ("prompt_completion", {"prompt": "Capital of France?", "completion": "Paris"}),
    ],
)
def test_a_sampling_prompt_is_laid_out_as_the_training_examples(fmt, row):
    tok = builtin.build_tokenizer()
    (example,), _ = tokenize_rows([row], fmt, tok, 256, completion_only_loss=True)
    answer_starts = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    ids = prompt_ids(tok, fmt, "Capital of France?")
    assert ids == example["input_ids"][:answer_starts]
    # A prompt typed in the layout already is not wrapped twice.
    assert prompt_ids(tok, fmt, tok.decode(ids)) == ids


def test_a_chat_prompt_goes_through_the_tokenizers_template():
    tok = builtin.build_tokenizer()
    assert tok.decode(prompt_ids(tok, "messages", "hi")) == "<|user|>\nhi\n<|assistant|>\n"
    assert tok.decode(prompt_ids(tok, "alpaca", "hi")) == "### Instruction:\nhi\n\n### Response:\n"
    assert tok.decode(prompt_ids(tok, "text", "Once upon")) == "Once upon"
