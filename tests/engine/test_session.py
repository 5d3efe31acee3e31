"""TrainingSession in its thread: the same API the GUI and CLI use; metrics.jsonl as the record."""

import json
import time

from tests.engine.helpers import make_cfg
from tunedeck.engine.protocol import Pause, Resume, Set, Stop, event_from_dict
from tunedeck.engine.session import TrainingSession


def wait_for(session, pred, timeout=60):
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        for e in session.drain():
            seen.append(e)
            if pred(e):
                return seen
        time.sleep(0.01)
    raise AssertionError(f"timed out; last events: {[e.type for e in seen[-5:]]}")


def test_pause_keeps_the_model_and_resume_continues(tmp_path):
    s = TrainingSession(make_cfg(tmp_path, train__max_steps=400), system_interval=0.05)
    s.start()
    wait_for(s, lambda e: e.type == "step" and e.step >= 2)
    s.send(Pause())
    seen = wait_for(s, lambda e: e.type == "state" and e.state == "paused")
    paused_at = max(e.step for e in seen if e.type == "step") if any(e.type == "step" for e in seen) else None
    time.sleep(0.3)
    quiet = [e for e in s.drain() if e.type == "step"]
    assert quiet == []  # nothing trains while paused
    s.send(Set({"learning_rate": 1e-3}))
    s.send(Resume())
    seen = wait_for(s, lambda e: e.type == "step")
    change = [e for e in seen if e.type == "change"][0]
    assert change.changes == {"learning_rate": [3e-3, 1e-3]}
    s.send(Stop())
    seen += wait_for(s, lambda e: e.type == "end")
    assert s.join(timeout=30) and not s.alive
    assert seen[-1].status == "stopped"
    assert paused_at is None or change.step >= paused_at
    # Everything that was emitted is in metrics.jsonl, in order, and parses back.
    lines = (s.run_dir / "metrics.jsonl").read_text().splitlines()
    kinds = [json.loads(line)["type"] for line in lines]
    assert kinds[0] == "state" and kinds[-1] == "end" and "start" in kinds and "system" in kinds
    assert event_from_dict(json.loads(lines[-1])).status == "stopped"
    assert (s.run_dir / "config.yaml").is_file()


def test_tensorboard_scalars_are_written_when_installed(tmp_path):
    import pytest

    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    s = TrainingSession(
        make_cfg(tmp_path, train__max_steps=3, data__eval_fraction=0.05, train__eval_steps=3),
        system_interval=0,
    )
    s.start()
    assert s.join(timeout=120)
    acc = EventAccumulator(str(s.run_dir / "tensorboard"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    recorded = [json.loads(x) for x in (s.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses == [pytest.approx(e["loss"]) for e in recorded if e["type"] == "step"]
    assert [e.step for e in acc.Scalars("eval/loss")] == [3]


def test_resume_from_an_earlier_checkpoint_supersedes_later_steps_in_tensorboard(tmp_path):
    import pytest

    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = TrainingSession(make_cfg(tmp_path, train__max_steps=6, train__save_steps=2), system_interval=0)
    first.start()
    assert first.join(timeout=120)
    # As a run killed after step 6 leaves its folder when only step 2's checkpoint got written: resuming
    # it continues in place (a later checkpoint or final/ would start a new run folder) and redoes 3..6.
    import shutil

    for later in ("checkpoints/step-000004", "final"):
        shutil.rmtree(first.run_dir / later)
    ckpt = first.run_dir / "checkpoints" / "step-000002"
    from tunedeck.engine import checkpoint

    cfg, _ = checkpoint.read_state(ckpt)
    second = TrainingSession(None, resume_from=ckpt, system_interval=0)
    second.start()
    assert second.join(timeout=120)
    assert second.run_dir == first.run_dir and cfg.train.max_steps == 6
    records = [json.loads(x) for x in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    starts = [i for i, e in enumerate(records) if e["type"] == "start"]
    assert [records[i]["step"] for i in starts] == [0, 2]
    # metrics.jsonl keeps both segments; the resumed one (after its start event) is what stands.
    redone = [e for e in records[starts[1] :] if e["type"] == "step"]
    assert [e["step"] for e in redone] == [3, 4, 5, 6]
    kept = [e for e in records[: starts[1]] if e["type"] == "step" and e["step"] <= 2] + redone
    acc = EventAccumulator(str(first.run_dir / "tensorboard"))
    acc.Reload()
    scalars = acc.Scalars("train/loss")
    assert [e.step for e in scalars] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in scalars] == [pytest.approx(e["loss"]) for e in kept]


def test_gpu_readings_degrade_to_none_without_a_gpu():
    import torch

    from tunedeck.engine.monitor import GpuReadings

    if torch.cuda.is_available():
        import pytest

        pytest.skip("reads a real GPU here")
    assert GpuReadings(0).read() == {
        "gpu_mem_total_mb": None,
        "gpu_util": None,
        "gpu_mem_used_mb": None,
        "gpu_power_w": None,
        "gpu_temp_c": None,
    }
