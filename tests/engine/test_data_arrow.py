"""Examples through Arrow: the same examples and split as tokenizing in memory, read row by row from
disk, cached by fingerprint under the builtin cache, progress while tokenizing, a full disk named,
and (slow) a file of tens of MB trained in a subprocess with its peak RSS bounded."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunedeck.engine import builtin, data_files
from tunedeck.engine import examples as store
from tunedeck.engine.cli import Printer
from tunedeck.engine.config import DataConfig
from tunedeck.engine.data import load_examples, load_rows, tokenize_rows
from tunedeck.engine.errors import DataError
from tunedeck.engine.protocol import ProgressEvent


@pytest.fixture(scope="module")
def tok():
    return builtin.build_tokenizer()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TUNEDECK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def rows_of(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"prompt": "p" * rng.randint(0, 20) + f"{i}: ", "completion": "c" * rng.randint(0, 12)}
        for i in range(n)
    ]


def in_memory_splits(rows, tok, max_length, eval_fraction, seed):
    """The examples and split as tokenizing everything in memory gives them (the code before Arrow)."""
    examples, dropped = tokenize_rows(rows, "prompt_completion", tok, max_length, True)
    n = len(examples)
    k = min(max(1, round(n * eval_fraction)), n - 1) if eval_fraction > 0 and n >= 2 else 0
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:k])
    train = [e for i, e in enumerate(examples) if i not in held]
    evals = [e for i, e in enumerate(examples) if i in held]
    return train, evals, dropped


def test_the_examples_and_split_are_those_of_the_in_memory_pipeline(tmp_path, tok, cache):
    rows = rows_of(2345)
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    s = load_examples(DataConfig(path=str(p), max_length=24, eval_fraction=0.1), tok, seed=3)
    train, evals, dropped = in_memory_splits(rows, tok, 24, 0.1, seed=3)
    assert dropped > 100  # long prompts leave no answer within 24 tokens
    assert isinstance(s.train, store.Examples) and not isinstance(s.train, list)
    assert (len(s.train), len(s.eval), s.dropped, s.format) == (
        len(train),
        len(evals),
        dropped,
        "prompt_completion",
    )
    assert s.train == train and s.eval == evals
    assert s.train[-1] == train[-1] and s.train[5:9] == train[5:9] and s.eval[::50] == evals[::50]
    assert all(type(t) is int for t in s.train[0]["input_ids"] + s.train[0]["labels"])


def test_a_second_load_opens_the_cache_without_reading_the_file(tmp_path, tok, cache, monkeypatch):
    (tmp_path / "data").mkdir()
    p = write_jsonl(tmp_path / "data" / "d.jsonl", rows_of(2500))
    cfg = DataConfig(path=str(p), max_length=32)
    events: list[ProgressEvent] = []
    first = load_examples(cfg, tok, seed=1, progress=events.append)
    # Rows counted while read and checked (total unknown until the end), then tokenized out of them.
    stages = [e.stage for e in events]
    assert stages == sorted(stages, key=["reading", "tokenizing"].index) and set(stages) == {
        "reading",
        "tokenizing",
    }
    reading = [(e.done, e.total) for e in events if e.stage == "reading"]
    tokenizing = [(e.done, e.total) for e in events if e.stage == "tokenizing"]
    assert reading[0] == (0, None) and reading[-1] == (2500, 2500) and {t for _, t in reading[1:-1]} <= {None}
    assert (
        tokenizing[0] == (0, 2500) and tokenizing[-1] == (2500, 2500) and {t for _, t in tokenizing} == {2500}
    )
    assert [d for d, _ in tokenizing] == sorted(d for d, _ in tokenizing)
    assert {e.unit for e in events} == {"rows"}
    # The cache is under the builtin cache folder, never beside the data.
    assert os.listdir(tmp_path / "data") == ["d.jsonl"]
    (folder,) = cache.iterdir()
    assert sorted(os.listdir(folder)) == ["examples.arrow", "meta.json"]

    def no_reading(self):
        raise AssertionError("the file was read again")

    monkeypatch.setattr(data_files.Files, "rows", no_reading)
    events.clear()
    t = time.perf_counter()
    second = load_examples(cfg, tok, seed=1, progress=events.append)
    assert time.perf_counter() - t < 1.0
    assert [(e.stage, e.done, e.total) for e in events] == [("tokenizing", 2500, 2500)]
    assert second == first and list(cache.iterdir()) == [folder]


def test_what_shapes_the_examples_makes_a_new_cache_entry(tmp_path, tok, cache):
    p = write_jsonl(tmp_path / "d.jsonl", rows_of(50))
    base = load_examples(DataConfig(path=str(p), max_length=32, eval_fraction=0.0), tok, seed=0)
    assert len(list(cache.iterdir())) == 1
    shorter = load_examples(DataConfig(path=str(p), max_length=8, eval_fraction=0.0), tok, seed=0)
    assert max(len(e["input_ids"]) for e in shorter.train) == 8 < max(len(e["input_ids"]) for e in base.train)
    every = load_examples(
        DataConfig(path=str(p), max_length=32, eval_fraction=0.0, completion_only_loss=False), tok, seed=0
    )
    assert every.train[0]["labels"] == every.train[0]["input_ids"] != base.train[0]["labels"]
    other = builtin.build_tokenizer()
    other.add_tokens(["ppp"])  # a different tokenizer: other ids for the same text
    assert (
        load_examples(DataConfig(path=str(p), max_length=32, eval_fraction=0.0), other, seed=0).train
        != base.train
    )
    assert len(list(cache.iterdir())) == 4
    # The same file rewritten: its entry is rebuilt, and the entries of the old content are removed.
    write_jsonl(p, [{"prompt": "new ", "completion": "rows"}] * 3)
    new = load_examples(DataConfig(path=str(p), max_length=32, eval_fraction=0.0), tok, seed=0)
    assert [tok.decode(e["input_ids"]) for e in new.train] == ["new rows</s>"] * 3
    assert len(list(cache.iterdir())) == 1


def test_a_damaged_cache_entry_is_rebuilt(tmp_path, tok, cache):
    p = write_jsonl(tmp_path / "d.jsonl", rows_of(40))
    cfg = DataConfig(path=str(p), max_length=32, eval_fraction=0.0)
    good = list(load_examples(cfg, tok, seed=0).train)
    (folder,) = cache.iterdir()
    (folder / "examples.arrow").write_bytes(b"not arrow at all")
    assert load_examples(cfg, tok, seed=0).train == good
    (folder / "meta.json").write_text("{")
    assert load_examples(cfg, tok, seed=0).train == good


def test_what_a_dead_build_left_is_removed_and_a_live_one_kept(tmp_path, tok, cache):
    dead, live = cache / ".0123.tmp-999999999", cache / f".4567.tmp-{os.getpid()}"
    for folder in (dead, live):
        folder.mkdir(parents=True)
        (folder / "rows.arrow").write_bytes(b"half written")
    p = write_jsonl(tmp_path / "d.jsonl", rows_of(10))
    load_examples(DataConfig(path=str(p), max_length=32), tok, seed=0)
    assert not dead.exists() and live.exists()


def test_one_example_costs_microseconds(tmp_path, tok, cache):
    p = write_jsonl(tmp_path / "d.jsonl", rows_of(3000))
    train = load_examples(DataConfig(path=str(p), max_length=32), tok, seed=0).train
    order = [random.Random(0).randrange(len(train)) for _ in range(3000)]
    t = time.perf_counter()
    for j in order:
        train[j]
    per_access = (time.perf_counter() - t) / len(order)
    assert per_access < 100e-6, f"{per_access * 1e6:.1f} us per example"  # a few us unloaded


def test_a_full_disk_is_named_and_leaves_nothing_behind(tmp_path, tok, monkeypatch):
    """A real full disk: the cache on a 256 kB tmpfs, the tokenized data several MB."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        monkeypatch.setenv("TUNEDECK_CACHE", str(mnt))
        p = write_jsonl(tmp_path / "d.jsonl", [{"text": "x" * 400}] * 3000)
        with pytest.raises(DataError) as e:
            load_examples(DataConfig(path=str(p), max_length=512), tok, seed=0)
        line = e.value.one_line()
        prefix = f"cannot write the tokenized data to {mnt / 'data'}: no space left on device ("
        assert line.startswith(prefix), line
        assert line.endswith(
            " MB free) (free some space there, or set TUNEDECK_CACHE to a folder on a disk with room)"
        )
        assert float(line[len(prefix) :].split()[0]) < 0.25
        assert os.listdir(mnt / "data") == []  # the half-written folder is gone
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ---------------------------------------------------------------- progress on the terminal


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_terminal_shows_reading_and_tokenizing(tmp_path, tok, cache):
    """The events of a load, through the CLI's printer: a bar each on a terminal, lines in a log."""
    p = write_jsonl(tmp_path / "d.jsonl", rows_of(2500))
    events: list[ProgressEvent] = []
    load_examples(DataConfig(path=str(p), max_length=32), tok, seed=1, progress=events.append)
    log = io.StringIO()
    printer = Printer(quiet=False, stream=log)
    for e in events:
        printer.handle(e)
    assert log.getvalue().splitlines() == [
        "reading...",
        "reading: 2,500 rows done",
        "tokenizing 2,500 rows...",
        "tokenizing: 2,500 rows done",
    ]
    tty = Tty()
    printer = Printer(quiet=False, stream=tty)
    for e in events:
        printer.handle(e)
    assert printer.prep is None  # each bar closed (and cleared) at its total
    text = tty.getvalue()
    assert text.index("\rreading: 0 rows [") < text.index("\rtokenizing:   0%|          | 0/2500 [")


# ---------------------------------------------------------------- a big file, in a subprocess


@pytest.mark.slow
def test_a_file_of_50_mb_trains_with_bounded_memory(tmp_path):
    """50 MB of JSON lines (53k rows of ~935 bytes, 1 token per byte with builtin:tiny) trained for 2
    steps by ``tunedeck-train`` in a child process with an empty cache. The code before Arrow held the
    whole text, every row parsed and every row's full-length token list at once: run this way on
    this file it passed 4 GB before it was killed (and 2.8 GB on 20 MB, 6 GB on 200 MB in
    bench/big_data.py). Here the child peaked at 0.69-0.70 GB (on 60 MB as on 50 MB), of which
    ~0.55 GB is torch, transformers and the model before any data; what grows with the file is the
    resident pages of the memory-mapped rows file while it is tokenized (clean pages the kernel can
    drop). 1.2 GB leaves room for that and for noise, and is under half what the old code took on a
    file 2.5x smaller."""
    from bench.big_data import make_jsonl

    data = make_jsonl(tmp_path / "big.jsonl", 50)
    # Both cores for the tokenizer, as a user's run has them (the test session turns that off).
    env = {**os.environ, "TUNEDECK_CACHE": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "true"}
    cmd = [sys.executable, "-m", "tunedeck.engine.cli", "--quiet", "--output-dir", str(tmp_path / "runs")]
    for s in (f"data.path={data}", "data.max_length=64", "data.completion_only_loss=false",
              "train.per_device_train_batch_size=4",
              "train.max_steps=2", "train.eval_steps=0", "train.save_steps=0"):  # fmt: skip
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read().decode() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output
    peak_mb = usage.ru_maxrss / 1024
    print(f"peak RSS of the child: {peak_mb:.0f} MB")
    assert peak_mb < 1200, f"peak RSS {peak_mb:.0f} MB"
    (metrics,) = (tmp_path / "runs").glob("*/metrics.jsonl")
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    start = next(e for e in events if e["type"] == "start")
    rows = sum(1 for _ in data.open("rb"))
    assert start["data"]["train_examples"] + start["data"]["eval_examples"] == rows
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2]


def test_a_run_reports_tokenizing_progress_before_it_starts(tmp_path):
    from tests.engine.helpers import make_cfg, of, run

    p = write_jsonl(tmp_path / "d.jsonl", rows_of(1500, seed=1))
    events, _ = run(make_cfg(tmp_path, data__path=str(p), train__max_steps=1))
    progress = [e for e in of(events, "progress") if e.stage in ("reading", "tokenizing")]
    assert [(e.stage, e.done, e.total) for e in progress if e.done in (0, 1500)] == [
        ("reading", 0, None),
        ("reading", 1500, 1500),
        ("tokenizing", 0, 1500),
        ("tokenizing", 1500, 1500),
    ]
    assert events.index(progress[-1]) < events.index(of(events, "start")[0])
    assert of(events, "end")[0].status == "completed"


def test_load_rows_still_returns_every_row(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", rows_of(1500))
    assert load_rows(str(p)) == rows_of(1500)
