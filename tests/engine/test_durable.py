"""Durable writes: atomic files and folders, swaps that always leave a complete folder, exclusive
run folders, and causes of write failures in one line."""

from __future__ import annotations

import errno
import threading

import pytest

from tunedeck.engine import durable
from tunedeck.engine.errors import ConfigError


def test_write_text_replaces_the_file_and_leaves_no_temporary(tmp_path):
    f = tmp_path / "config.yaml"
    durable.write_text(f, "a: 1\n")
    durable.write_text(f, "a: 2\n")
    assert f.read_text() == "a: 2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_write_text_that_fails_keeps_the_old_file(tmp_path, monkeypatch):
    f = tmp_path / "config.yaml"
    durable.write_text(f, "old\n")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(durable.os, "fsync", full)
    with pytest.raises(OSError):
        durable.write_text(f, "new\n")
    assert f.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def _folder(path, text):
    path.mkdir()
    (path / "a.txt").write_text(text)
    (path / "b.txt").write_text(text * 2)
    return path


@pytest.mark.parametrize("swap", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_install_dir_replaces_an_existing_folder_whole(tmp_path, monkeypatch, swap):
    if not swap:
        monkeypatch.setattr(durable, "_exchange", lambda a, b: False)
    target = _folder(tmp_path / "final", "old")
    durable.install_dir(_folder(tmp_path / ".tmp-final", "new"), target)
    assert (target / "a.txt").read_text() == "new" and (target / "b.txt").read_text() == "newnew"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_the_exchange_is_one_step_on_this_file_system(tmp_path):
    a, b = _folder(tmp_path / "a", "A"), _folder(tmp_path / "b", "B")
    assert durable._exchange(a, b)
    assert (a / "a.txt").read_text() == "B" and (b / "a.txt").read_text() == "A"


def test_a_crash_between_the_two_renames_is_undone(tmp_path):
    # The fallback's only window: the old folder renamed aside, the new one not yet in place.
    target = tmp_path / "final"
    _folder(tmp_path / ".old-final", "old")
    durable.recover_dir(target)
    assert (target / "a.txt").read_text() == "old"
    assert not (tmp_path / ".old-final").exists()


def test_run_folders_are_exclusive_when_started_at_once(tmp_path):
    barrier = threading.Barrier(16)
    made: list = []

    def start():
        barrier.wait()
        made.append(durable.make_run_dir(tmp_path / "runs", "same"))

    threads = [threading.Thread(target=start) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name for p in made) == sorted(["same"] + [f"same-{n}" for n in range(2, 17)])


def test_a_run_folder_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError) as e:
        durable.make_run_dir(tmp_path / "file", "r")
    assert e.value.message.startswith(f"could not create train.output_dir {tmp_path / 'file'}: ")


def test_causes_of_failed_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(durable, "free_bytes", lambda path: 1_234_567)
    disk = durable.mount_point(tmp_path)  # the disk, not the folder: what has to be freed
    assert durable.describe(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "x") == (
        f"no space left on device: 1.2 MB free on {disk}"
    )
    # safetensors names the OS error inside its text; torch.save does not name it at all
    err = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert durable.describe(err, tmp_path).startswith("no space left on device: ")
    assert durable.describe(OSError(errno.EROFS, "Read-only file system"), tmp_path / "new" / "x") == (
        f"read-only file system at {tmp_path}"
    )
    assert durable.describe(ValueError("odd\nmore"), tmp_path) == "ValueError: odd"


def test_sizes_as_people_read_them():
    assert [durable.human(n) for n in (512, 1_234_567, 3_400_000_000)] == ["512 B", "1.2 MB", "3.4 GB"]


def test_low_space_asks_for_twice_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(durable, "free_bytes", lambda path: 7_000_000)
    assert durable.low_space(tmp_path, 3_500_000) is None
    assert durable.low_space(tmp_path, 3_600_000) == (
        f"low disk space: 7.0 MB free on {tmp_path}, and a checkpoint takes about 3.6 MB"
    )
