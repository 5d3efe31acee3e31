"""Sinks never raise into the engine: a write that fails (here to /dev/full, which refuses every
write with ENOSPC) is said once, its events are kept, and written when the file can be written."""

from __future__ import annotations

import json
import os

import pytest

from tunedeck.engine import sinks
from tunedeck.engine.protocol import EndEvent, EvalEvent, Event, StartEvent, StepEvent

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")


def _steps(*ns: int) -> list[StepEvent]:
    return [StepEvent(step=n, loss=1.0 / n, learning_rate=1e-3, total_steps=9) for n in ns]


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_metrics_kept_in_memory_while_the_disk_is_full_and_written_after(tmp_path, monkeypatch):
    monkeypatch.setattr(sinks.JsonlSink, "RETRY_S", 0.0)
    metrics = tmp_path / "metrics.jsonl"
    metrics.symlink_to("/dev/full")
    log = sinks.RunLog()
    assert log.open([sinks.JsonlSink(tmp_path)]) == []
    said: list[Event] = []
    for e in _steps(1, 2, 3):
        said += log.write(e)
    assert [e.type for e in said] == ["warning"]  # once, not once per event
    assert said[0].message.startswith(f"could not write {metrics}: no space left on device: ")
    assert said[0].message.endswith(
        "the run goes on and its events are kept in memory until they can be written"
    )
    metrics.unlink()  # the disk has room again
    said = log.write(_steps(4)[0])
    assert [e.message for e in said] == [f"{metrics} is written again: the events held in memory are in it"]
    said = log.write(EndEvent(status="completed", step=4)) + log.close()
    assert said == []
    lines = _lines(metrics)
    assert [(x["type"], x.get("step")) for x in lines] == [
        ("step", 1),
        ("warning", None),
        ("step", 2),
        ("step", 3),
        ("step", 4),
        ("warning", None),
        ("end", 4),
    ]


def test_events_that_never_could_be_written_are_counted_at_the_end(tmp_path):
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    log = sinks.RunLog()
    log.open([sinks.JsonlSink(tmp_path)])
    said = log.write(_steps(1)[0]) + log.write(EndEvent(status="completed", step=1)) + log.close()
    assert [e.message.split(":")[0] for e in said] == [
        f"could not write {tmp_path / 'metrics.jsonl'}",
        f"{tmp_path / 'metrics.jsonl'} misses its last 3 events",
    ]


def test_a_sink_that_raises_is_said_once_and_the_others_go_on(tmp_path):
    class Broken:
        def write(self, event: Event) -> None:
            raise RuntimeError("remote logger down")

        def close(self) -> None:
            raise RuntimeError("still down")

    log = sinks.RunLog()
    log.open([Broken(), sinks.JsonlSink(tmp_path)])
    said = [n for e in _steps(1, 2) for n in log.write(e)]
    assert [e.message for e in said] == ["Broken could not record an event: RuntimeError: remote logger down"]
    assert log.close() == []
    assert [x["type"] for x in _lines(tmp_path / "metrics.jsonl")] == ["step", "warning", "step"]


def test_tensorboard_scalars_kept_while_their_folder_cannot_be_written(tmp_path, monkeypatch):
    if not sinks.TensorBoardSink.available():
        pytest.skip("tensorboard is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr(sinks.TensorBoardSink, "RETRY_S", 0.0)
    (tmp_path / "tensorboard").write_text("a file where the folder goes")
    sink = sinks.TensorBoardSink(tmp_path)
    sink.write(StartEvent(step=0))
    for e in _steps(1, 2):
        sink.write(e)
    assert [e.message.split(":")[0] for e in sink.notices] == [
        f"could not write the TensorBoard log in {tmp_path / 'tensorboard'}"
    ]
    (tmp_path / "tensorboard").unlink()
    sink.write(_steps(3)[0])
    sink.write(EvalEvent(step=3, eval_loss=0.5))
    sink.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [s.step for s in acc.Scalars("train/loss")] == [1, 2, 3]
    assert [s.value for s in acc.Scalars("eval/loss")] == [0.5]
