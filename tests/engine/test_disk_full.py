"""A real full disk: a small tmpfs mounted by the test (as root), holding the run folder.

A checkpoint that does not fit is an error naming the cause, earlier checkpoints stay whole and
training goes on; metrics.jsonl is kept in memory while the disk is full and written when there
is room again; a disk full from the start ends the run with one line per failed write, never a
hang. Without root (no mount) these tests are skipped; the sink tests cover the same with
/dev/full, and the last test here, with the libraries' own exceptions."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from tests.engine.helpers import CliRun, make_cfg, of, run
from tunedeck.engine import checkpoint, durable, sinks
from tunedeck.engine.protocol import Stop
from tunedeck.engine.session import TrainingSession


@pytest.fixture
def disk(tmp_path, request):
    """A tmpfs of ``request.param`` (e.g. "6m") at tmp_path/disk, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; test_sinks covers full writes with /dev/full")
    where = tmp_path / "disk"
    where.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={request.param}", "tmpfs", str(where)]
    ).returncode:
        pytest.skip("mount is not allowed here")
    yield where
    subprocess.run(["umount", "-l", str(where)])


def fill(where) -> None:
    """Take every free byte."""
    with open(where / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def no_space(where) -> str:
    return rf"no space left on device: \d+(\.\d)? [kM]?B free on {re.escape(str(where))}"


@pytest.mark.slow
@pytest.mark.parametrize("disk", ["6m"], indirect=True)
def test_checkpoints_that_do_not_fit_fail_alone_and_training_goes_on(disk):
    # A checkpoint (r=32: adapter and Adam moments) takes about 3.6 MB: one fits on 6 MB, not two.
    cfg = make_cfg(
        disk,
        train__output_dir=str(disk),
        train__run_name="r",
        train__max_steps=5,
        train__save_steps=1,
        data__max_length=64,
    )
    events, t = run(cfg)
    run_dir = disk / "r"
    assert events[-1].status == "completed" and [e.step for e in of(events, "step")] == [1, 2, 3, 4, 5]
    errors = of(events, "error")
    assert [e.message.split(":")[0] for e in errors] == [
        f"could not save {run_dir}/checkpoints/step-00000{n}" for n in (2, 3, 4)
    ]
    for e in errors:
        assert re.fullmatch(rf"could not save .*: {no_space(disk)}", e.message), e.message
        assert e.kind == "config" and e.advice == durable.WRITE_ADVICE + "; training goes on"
    warnings = [e for e in of(events, "warning") if e.message.startswith("low disk space")]
    assert len(warnings) == 1  # before the first checkpoint, and not again while it stays low
    assert re.fullmatch(
        rf"low disk space: \d\.\d MB free on {re.escape(str(run_dir))}, and a checkpoint takes about \d\.\d MB",
        warnings[0].message,
    )
    assert events.index(warnings[0]) < events.index(errors[0])
    # The first checkpoint is whole, nothing half-written is left, and final/ (no optimizer) fitted.
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step-000001"]
    first = checkpoint.open_resume(run_dir / "checkpoints" / "step-000001")
    assert first.state["step"] == 1
    checkpoint.load_weights(t.model, first.folder)
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("disk", ["4m"], indirect=True)
def test_metrics_are_kept_while_the_disk_is_full_and_written_when_there_is_room(disk, monkeypatch):
    monkeypatch.setattr(sinks.JsonlSink, "RETRY_S", 0.2)
    cfg = make_cfg(
        disk,
        train__output_dir=str(disk),
        train__run_name="r",
        train__max_steps=100000,
        data__max_length=64,
        lora__r=4,
    )
    s = TrainingSession(cfg, system_interval=0.1)
    s.start()
    seen: list = []

    def until(pred, timeout=120.0):
        deadline = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < deadline and s.alive
            seen.extend(s.drain())
            time.sleep(0.02)

    def steps():
        return [e.step for e in seen if e.type == "step"]

    until(lambda: len(steps()) >= 2)
    fill(disk)
    until(lambda: any(e.type == "warning" and "metrics.jsonl" in e.message for e in seen))
    full_at = steps()[-1]
    until(lambda: steps()[-1] >= full_at + 5)  # training goes on while nothing can be written
    os.unlink(disk / "filler")
    until(lambda: any(e.type == "warning" and "is written again" in e.message for e in seen))
    s.send(Stop())
    assert s.join(120)
    seen.extend(s.drain())
    metrics = disk / "r" / "metrics.jsonl"
    full = next(e for e in seen if e.type == "warning" and "metrics.jsonl" in e.message)
    assert re.fullmatch(
        rf"could not write {re.escape(str(metrics))}: {no_space(disk)}; the run goes on and its events are "
        "kept in memory until they can be written",
        full.message,
    )
    lines = metrics.read_text().splitlines()
    written = [json.loads(x) for x in lines]  # every line whole: a short write was cut back off
    assert [e["step"] for e in written if e["type"] == "step"] == steps()
    assert [e["message"] for e in written if e["type"] == "warning" and "metrics.jsonl" in e["message"]] == [
        full.message,
        f"{metrics} is written again: the events held in memory are in it",
    ]
    assert written[-1]["type"] == "end" and written[-1]["status"] == "stopped"


@pytest.mark.slow
@pytest.mark.parametrize("disk", ["1m"], indirect=True)
def test_a_disk_full_from_the_start_ends_the_run_with_its_causes(disk, capsys):
    fill(disk)
    args = ["--output-dir", str(disk), "--set", "train.run_name=r", "--set", "train.max_steps=3"]
    args += ["--set", "train.save_steps=1", "--set", "data.max_length=64", "--set", "lora.r=4"]
    run = CliRun(args, disk / "r")
    code = run.join(180)
    assert not run.thread.is_alive(), "tunedeck-train hung on a full disk"
    out = capsys.readouterr().out
    run_dir = disk / "r"
    assert code == 1
    said = [x for x in out.splitlines() if x.startswith(("warning:", "error:"))]
    tb = sinks.TensorBoardSink.available()
    patterns = [
        rf"warning: could not write {run_dir}/config.yaml: {no_space(disk)} \(.*\)",
        rf"warning: could not write {run_dir}/metrics.jsonl: {no_space(disk)}; the run goes on .*",
        *(
            [rf"warning: could not write the TensorBoard log in {run_dir}/tensorboard: {no_space(disk)}; .*"]
            * tb
        ),
        *[
            rf"error: could not save {run_dir}/checkpoints/step-00000{n}: {no_space(disk)} \(.*\)"
            for n in (1, 2)
        ],
        rf"error: could not save {run_dir}/final: {no_space(disk)} \(.*\)",
        rf"warning: {run_dir}/metrics.jsonl misses its last \d+ events: {no_space(disk)} \(.*\)",
        *([rf"warning: the TensorBoard log in {run_dir}/tensorboard misses its last \d+ events: .*"] * tb),
    ]
    low = [x for x in said if x.startswith("warning: low disk space")]
    assert len(low) == 1
    said.remove(low[0])
    assert len(said) == len(patterns), "\n".join(said)
    for line, pattern in zip(said, patterns, strict=True):
        assert re.fullmatch(pattern.replace("/", re.escape("/")), line), (line, pattern)
    assert out.rstrip().endswith("failed at step 3")


def test_library_write_errors_are_errors_with_their_cause_not_bugs(tmp_path, monkeypatch):
    """torch.save raises RuntimeError and safetensors SafetensorError, not OSError: each is a
    failed save that names its cause, and the run goes on."""
    import peft.peft_model
    import torch
    from safetensors import SafetensorError

    real_save, real_st = torch.save, peft.peft_model.safe_save_file
    failures = iter(
        [
            (
                "torch",
                RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1336256 vs 1336148"),
            ),
            (
                "safetensors",
                SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
            ),
        ]
    )
    plan = {2: next(failures), 3: next(failures)}
    state = {"step": 0}

    def torch_save(obj, f, *a, **k):
        which, err = plan.get(state["step"], (None, None))
        if which == "torch":
            raise err
        return real_save(obj, f, *a, **k)

    def st_save(*a, **k):
        which, err = plan.get(state["step"], (None, None))
        if which == "safetensors":
            raise err
        return real_st(*a, **k)

    monkeypatch.setattr(torch, "save", torch_save)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", st_save)
    from tunedeck.engine.trainer import Trainer

    real_write = Trainer.save_checkpoint

    def save(self, *a, **k):
        state["step"] = self.step
        return real_write(self, *a, **k)

    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    events, t = run(
        make_cfg(tmp_path, train__max_steps=4, train__save_steps=1, data__max_length=64, lora__r=4)
    )
    assert events[-1].status == "completed"
    messages = [e.message for e in of(events, "error")]
    where = t.run_dir / "checkpoints"
    assert messages[0] == (
        f"could not save {where}/step-000002: RuntimeError: [enforce fail at inline_container.cc:672] . "
        "unexpected pos 1336256 vs 1336148"
    )
    assert messages[1].startswith(f"could not save {where}/step-000003: no space left on device: ")
    assert sorted(os.listdir(where)) == ["step-000001"]
