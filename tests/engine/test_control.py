"""The control file: every bad line becomes an error and the reader goes on; split characters,
rewritten and replaced files; and a run driven through it with hostile lines."""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.engine.helpers import CliRun
from tunedeck.engine.control import EXAMPLE, ControlFile
from tunedeck.engine.errors import ConfigError
from tunedeck.engine.session import TrainingSession


class Recorder:
    def __init__(self) -> None:
        self.sent: list = []
        self.errors: list[str] = []

    def send(self, command) -> None:
        self.sent.append(command)

    def report(self, event) -> None:
        assert event.type == "error" and event.kind == "config"
        self.errors.append(event.message)


def follow(path):
    r = Recorder()
    return r, ControlFile(path, r.send, r.report)


def append(path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def test_only_lines_written_after_the_start_count(tmp_path):
    ctl = tmp_path / "ctl.jsonl"
    ctl.write_text('{"cmd": "stop"}\n')
    r, c = follow(ctl)
    append(ctl, b'{"cmd": "pause"}\n')
    c.poll()
    assert r.sent == [{"cmd": "pause"}] and r.errors == []


def test_bad_lines_are_errors_and_the_reader_goes_on(tmp_path):
    ctl = tmp_path / "ctl.jsonl"
    r, c = follow(ctl)
    append(ctl, b"not json\n")
    append(ctl, '{"cmd": "sample", "prompt": "été"}\n'.encode("latin-1"))
    append(ctl, b"[" * 100_000 + b"\n")
    append(ctl, b"\n   \n")
    append(ctl, b'{"cmd": "stop"}\n')
    c.poll()
    where = f"control: line {{}} of {ctl}"
    assert r.errors == [
        where.format(1) + " is not JSON (Expecting value); ignored: not json",
        where.format(2) + " is not UTF-8 text (byte 0xe9 at column 30); ignored",
        where.format(3) + " nests too deep to read; ignored",
    ]
    assert r.sent == [{"cmd": "stop"}]


def test_a_character_split_across_two_writes(tmp_path):
    ctl = tmp_path / "ctl.jsonl"
    r, c = follow(ctl)
    append(ctl, b'{"cmd": "sample", "prompt": "caf' + b"\xc3")
    c.poll()
    assert r.sent == [] and r.errors == []
    append(ctl, b'\xa9"}\n')
    c.poll()
    assert r.sent == [{"cmd": "sample", "prompt": "café"}] and r.errors == []


def test_a_file_rewritten_in_place_with_new_text(tmp_path):
    ctl = tmp_path / "ctl.jsonl"
    r, c = follow(ctl)
    append(ctl, b'{"cmd": "eval"}\n')
    c.poll()
    # `>` for `>>`: the same file, cut and written again, as long as what was read before
    with open(ctl, "wb") as f:
        f.write(b'{"cmd":          "stop"}\n')
    c.poll()
    assert r.sent == [{"cmd": "eval"}, {"cmd": "stop"}] and r.errors == []


def test_a_file_replaced_by_an_editor_keeps_what_was_read(tmp_path):
    ctl = tmp_path / "ctl.jsonl"
    r, c = follow(ctl)
    append(ctl, b'{"cmd": "eval"}\n')
    c.poll()
    new = tmp_path / "ctl.jsonl.new"  # an editor's save: a new file renamed over the old
    new.write_bytes(b'{"cmd": "eval"}\n{"cmd": "pause"}\n')
    os.replace(new, ctl)
    c.poll()
    ctl.unlink()  # removed: nothing to read until it is back
    c.poll()
    ctl.write_bytes(b'{"cmd": "resume"}\n')
    c.poll()
    assert r.sent == [{"cmd": "eval"}, {"cmd": "pause"}, {"cmd": "resume"}] and r.errors == []


def test_the_reader_thread_survives_an_unreadable_file(tmp_path, monkeypatch):
    ctl = tmp_path / "ctl.jsonl"
    r, c = follow(ctl)
    monkeypatch.setattr(ControlFile, "POLL_S", 0.01)
    calls = {"n": 0}
    real = c._new_bytes

    def flaky():
        calls["n"] += 1
        if calls["n"] <= 3:
            raise PermissionError(13, "Permission denied")
        return real()

    c._new_bytes = flaky
    c.start()
    append(ctl, b'{"cmd": "stop"}\n')
    deadline = time.monotonic() + 10
    while not r.sent and time.monotonic() < deadline:
        time.sleep(0.01)
    c.stop()
    assert r.sent == [{"cmd": "stop"}]
    assert r.errors == [f"control: could not read {ctl}: PermissionError: [Errno 13] Permission denied"]


def test_malformed_commands_through_a_session_are_error_events(tmp_path):
    s = TrainingSession(None, resume_from=tmp_path / "never-started")
    for bad in ({"cmd": ["set"]}, {"cmd": {"x": 1}}, [1, 2], "stop", 5, {"cmd": "set"}):
        s.send(bad)
    assert [e.message for e in s.drain()] == [
        "unknown command ['set']",
        "unknown command {'x': 1}",
        "a command must be an object with a 'cmd' key, got [1, 2]",
        "a command must be an object with a 'cmd' key, got 'stop'",
        "a command must be an object with a 'cmd' key, got 5",
        "set names no hyperparameter",
    ]


def test_check_path(tmp_path):
    from tunedeck.engine.control import check_path

    check_path(tmp_path / "new.jsonl")
    assert (tmp_path / "new.jsonl").is_file()
    with pytest.raises(ConfigError):
        check_path(tmp_path)
    with pytest.raises(ConfigError):
        check_path(tmp_path / "no" / "ctl.jsonl")


@pytest.mark.slow
def test_hostile_control_lines_in_a_run_are_recorded_and_stop_still_works(tmp_path, capsys):
    ctl = tmp_path / "ctl.jsonl"
    args = ["--output-dir", str(tmp_path), "--set", "train.run_name=r", "--set", "train.max_steps=100000"]
    args += ["--set", "data.max_length=64", "--set", "train.eval_steps=0", "--control", str(ctl)]
    run = CliRun(args, tmp_path / "r")
    events, wait_for = run.events, run.wait_for

    wait_for(lambda ev: any(e["type"] == "step" for e in ev))
    append(ctl, b'{"cmd": ["set"]}\n')
    append(ctl, '{"cmd": "sample", "prompt": "été"}\n'.encode("latin-1"))
    append(ctl, b'{"cmd": "sample", "prompt": "caf' + b"\xc3")
    time.sleep(0.5)  # the reader sees half a character, and waits for the rest
    append(ctl, b'\xa9", "max_new_tokens": 4}\n')
    append(ctl, json.dumps({"cmd": "sample", "prompt": "word " * 100_000}).encode() + b"\n")
    append(ctl, b"learning_rate=1e-4\n")
    wait_for(
        lambda ev: (
            any(e["type"] == "sample" for e in ev) and len([e for e in ev if e["type"] == "error"]) >= 4
        )
    )
    append(ctl, b'{"cmd": "stop"}\n')
    assert run.join(120) == 0
    # The reader says what it cannot read at once; the engine refuses commands at its next boundary.
    errors = sorted(e["message"] for e in events() if e["type"] == "error")
    where = f"control: line {{}} of {ctl}"
    assert errors == [
        where.format(2) + " is not UTF-8 text (byte 0xe9 at column 30); ignored",
        where.format(5) + " is not JSON (Expecting value); ignored: learning_rate=1e-4",
        "the sample prompt is 500,000 tokens; with max_new_tokens=64 it exceeds the model's context of 2,048 "
        "tokens",
        "unknown command ['set']",
    ]
    assert [e["prompt"] for e in events() if e["type"] == "sample"] == ["café"]
    assert events()[-1]["type"] == "end" and events()[-1]["status"] == "stopped"
    assert all(e["advice"] == EXAMPLE for e in events() if e["type"] == "error" and "line" in e["message"])
