"""Bad data is named by its cause: chat roles, conversations without an answer, bad rows and files
in files and folders, each with the row or line and the fix, in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunedeck.engine import builtin
from tunedeck.engine.config import DataConfig
from tunedeck.engine.data import load_examples, load_rows, preview, tokenize_rows
from tunedeck.engine.errors import DataError


@pytest.fixture(scope="module")
def tok():
    return builtin.build_tokenizer()


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEDECK_CACHE", str(tmp_path / "cache"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(*roles: str) -> dict:
    return {"messages": [{"role": r, "content": f"{r} says hi"} for r in roles]}


def refusal(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as e:
        fn(*args, **kwargs)
    return e.value.one_line()


# ---------------------------------------------------------------- chat roles


def test_an_unknown_role_names_the_row_the_role_and_the_roles(tmp_path, tok):
    p = write_jsonl(tmp_path / "chat.jsonl", [chat("user", "assistant"), chat("user", "wizard", "assistant")])
    assert refusal(load_examples, DataConfig(path=str(p)), tok, seed=0) == (
        "row 2: message 2 has the unknown role 'wizard' (use one of system, user, assistant)"
    )


def test_a_misspelled_assistant_is_named_not_blamed_on_max_length(tmp_path, tok):
    """Before, every row without a target was dropped and the run said every example was too long."""
    p = write_jsonl(tmp_path / "chat.jsonl", [chat("system", "user", "assitant")] * 3)
    assert refusal(load_examples, DataConfig(path=str(p)), tok, seed=0) == (
        "row 1: message 3 has the unknown role 'assitant' "
        "(did you mean 'assistant'? use one of system, user, assistant)"
    )


def test_a_conversation_without_an_assistant_turn_is_named(tmp_path, tok):
    p = write_jsonl(
        tmp_path / "chat.jsonl",
        [chat("user", "assistant"), chat("user", "assistant"), chat("system", "user")],
    )
    assert refusal(load_examples, DataConfig(path=str(p)), tok, seed=0) == (
        "row 3: no message has the role 'assistant' (roles: system, user), so it has nothing to learn "
        "(add the assistant's reply, or set data.completion_only_loss=false to train on every token)"
    )
    # Trained on every token, it has something to learn.
    s = load_examples(DataConfig(path=str(p), completion_only_loss=False, eval_fraction=0.0), tok, seed=0)
    assert (len(s.train), s.dropped) == (3, 0)


def test_tool_turns_are_allowed_where_the_template_renders_them(tok):
    rows = [chat("user", "assistant", "tool", "assistant")]
    assert refusal(tokenize_rows, rows, "messages", tok, 64, True) == (
        "row 1: message 3 has the unknown role 'tool' (use one of system, user, assistant)"
    )
    with_tools = builtin.build_tokenizer()
    with_tools.chat_template = builtin.CHAT_TEMPLATE.replace(
        "{% for m in messages %}", "{% for m in messages %}{# tool #}"
    )
    (example,), dropped = tokenize_rows(rows, "messages", with_tools, 256, True)
    assert dropped == 0 and with_tools.decode(example["input_ids"]).count("<|tool|>") == 1
    assert refusal(tokenize_rows, [chat("user", "wizard")], "messages", with_tools, 64, True) == (
        "row 1: message 2 has the unknown role 'wizard' (use one of system, user, assistant, tool)"
    )


# ---------------------------------------------------------------- rows and lines of files


def test_a_bad_row_deep_in_a_file_is_named_by_its_row(tmp_path, tok):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(2500)]
    rows[2345]["completion"] = 7  # in the third batch of rows read
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    assert refusal(load_examples, DataConfig(path=str(p)), tok, seed=0) == (
        "row 2346: column 'completion' is int, not text (give every row a text value there)"
    )


def test_malformed_json_deep_in_a_file_is_named_by_its_line(tmp_path, tok):
    p = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": f"t{i}"}) for i in range(3000)]
    lines[2999] = '{"text": "unterminated}'
    p.write_text("\n\n".join(lines) + "\n")  # blank lines between rows: line numbers are not row numbers
    assert refusal(load_examples, DataConfig(path=str(p)), tok, seed=0) == (
        f"{p}, line 5999: malformed JSON (Unterminated string starting at column 10) "
        "(fix that line: each line must be one complete JSON object)"
    )


def test_bytes_that_are_not_utf8_are_named_by_line_and_byte(tmp_path, tok):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert refusal(load_rows, str(p)) == f"{p}, line 2: not UTF-8 text (byte 28) (re-save the file as UTF-8)"
    c = tmp_path / "d.csv"
    c.write_bytes(b"text\nok\ncaf\xe9\n")
    assert refusal(load_rows, str(c)) == f"{c}, line 3: not UTF-8 text (byte 11) (re-save the file as UTF-8)"


# ---------------------------------------------------------------- folders


def test_a_folder_whose_file_does_not_parse_names_the_file(tmp_path, tok):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"text": "fine"}])
    (folder / "b.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    message = refusal(load_examples, DataConfig(path=str(folder)), tok, seed=0)
    assert message == (
        f"{folder / 'b.jsonl'}, line 2: malformed JSON (Expecting value at column 10) "
        "(fix that line: each line must be one complete JSON object)"
    )
    assert "network" not in message
    (folder / "b.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    assert refusal(load_examples, DataConfig(path=str(folder)), tok, seed=0) == (
        f"{folder / 'b.jsonl'}, row 2: column 'text' is int, not text (give every row a text value there)"
    )
    (folder / "b.jsonl").unlink()
    (folder / "c.parquet").write_bytes(b"PAR1 this is not parquet")
    assert refusal(load_examples, DataConfig(path=str(folder)), tok, seed=0).startswith(
        f"{folder / 'c.parquet'} is not a readable parquet file ("
    )


def test_a_folder_is_read_by_split_as_datasets_names_its_files(tmp_path, tok):
    folder = tmp_path / "ds"
    (folder / "data").mkdir(parents=True)
    write_jsonl(folder / "data" / "train-00000.jsonl", [{"text": "a"}, {"text": "b"}])
    write_jsonl(folder / "data" / "train-00001.jsonl", [{"text": "c"}])
    write_jsonl(folder / "data" / "test.jsonl", [{"text": "z"}])
    (folder / "README.md").write_text("not data")
    assert [r["text"] for r in load_rows(str(folder))] == ["a", "b", "c"]
    assert load_rows(str(folder), split="test") == [{"text": "z"}]
    assert preview(str(folder)) == ("text", [{"text": "a"}, {"text": "b"}, {"text": "c"}], 3)
    s = load_examples(DataConfig(path=str(folder), split="test", eval_fraction=0.0), tok, seed=0)
    assert [tok.decode(e["input_ids"]) for e in s.train] == ["z</s>"]
    assert refusal(load_rows, str(folder), split="validation") == (
        f"folder {folder} has no files for split 'validation' (it has test, train) "
        "(set data.split to one of test, train, or name a file after the split (e.g. validation.jsonl))"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    assert refusal(load_rows, str(empty)) == (
        f"folder {empty} holds no .jsonl, .json, .csv, .parquet files "
        "(point data.path at a data file, or at a folder of them)"
    )


# ---------------------------------------------------------------- hub datasets


def test_a_hub_dataset_is_checked_row_by_row_and_cached(tok, monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake(name, split):
        calls.append(name)
        rows = [chat("user", "assistant") for _ in range(5)]
        if name == "someone/bad":
            rows[3] = chat("user", "wizard")
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert refusal(load_examples, DataConfig(path="someone/bad"), tok, seed=0) == (
        "row 4: message 2 has the unknown role 'wizard' (use one of system, user, assistant)"
    )
    s = load_examples(DataConfig(path="someone/chat", eval_fraction=0.0), tok, seed=0)
    assert (s.format, len(s.train)) == ("messages", 5)
    assert (
        tok.decode(s.train[0]["input_ids"])
        == "<|user|>\nuser says hi\n<|assistant|>\nassistant says hi</s>\n"
    )
    again = load_examples(DataConfig(path="someone/chat", eval_fraction=0.0), tok, seed=0)
    assert again == s and len(list((tmp_path / "cache" / "data").iterdir())) == 1


def test_a_hub_dataset_whose_files_do_not_parse_is_not_a_network_problem(tok, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def fake(name, split):
        try:
            raise ValueError("JSON parse error: Missing a name for object member. in row 7")
        except ValueError as e:
            raise datasets.exceptions.DatasetGenerationError(
                "An error occurred while generating the dataset"
            ) from e

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert refusal(load_rows, "someone/broken") == (
        "dataset 'someone/broken' (split 'train') has files that cannot be read: JSON parse error: "
        "Missing a name for object member. in row 7 "
        "(download its files and point data.path at them to find the bad one)"
    )
