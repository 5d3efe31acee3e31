"""Rollback: back to a checkpoint in memory, exactly; the abandoned steps kept as a branch."""

import json

import pytest
import torch

from tests.engine.helpers import make_cfg, of, run, steps
from tunedeck.engine import checkpoint, protocol
from tunedeck.engine import config as config_mod
from tunedeck.engine.config import LIVE_KEYS
from tunedeck.engine.errors import ConfigError
from tunedeck.engine.protocol import Rollback, Save, Set

# Dropout on, so the RNG must be restored too; cosine with warm-up, so the schedule must be.
KW = dict(
    data__max_length=64,
    train__max_steps=8,
    train__save_steps=3,
    lora__dropout=0.1,
    train__lr_scheduler_type="cosine",
    train__warmup_steps=2,
)


def weights(t):
    return {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}


def test_rollback_without_change_ends_in_bit_equal_weights(tmp_path):
    full, a = run(make_cfg(tmp_path / "a", **KW))
    # From step 7 back to step 3: the checkpoint of step 6 is on the abandoned branch.
    events, b = run(make_cfg(tmp_path / "b", **KW), at={7: [Rollback("step-000003")]})
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for n in wa:
        assert torch.equal(wa[n], wb[n]), n
    assert events[-1].status == "completed" and events[-1].step == 8
    # Steps 1-7, then 4-8 again with exactly the losses and LRs of the run without the rollback.
    reported = [e.step for e in of(events, "step")]
    assert reported == [1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7, 8]
    after = of(events, "step")[7:]
    ref = steps(full)
    assert [(e.loss, e.learning_rate) for e in after] == [
        (ref[s].loss, ref[s].learning_rate) for s in range(4, 9)
    ]
    rb = of(events, "rollback")[0]
    assert (rb.from_step, rb.to_step, rb.checkpoint, rb.branch) == (7, 3, "step-000003", 1)
    change = [c for c in of(events, "change") if "step" in c.changes][0]
    assert change.changes == {"step": [7, 3]} and change.source == "user" and change.step == 3


def test_branches_are_kept_in_the_folder_and_in_the_events(tmp_path):
    at = {7: [Rollback("step-000003")], 5: [Rollback("latest")]}
    events, t = run(make_cfg(tmp_path, **KW), at=at)
    # Step 5 -> latest = 3 (branch 1, no checkpoint after 3 yet); then step 7 -> 3 (branch 2: step 6's moves).
    assert [(e.from_step, e.to_step, e.branch) for e in of(events, "rollback")] == [(5, 3, 1), (7, 3, 2)]
    run_dir = t.run_dir
    b1 = json.loads((run_dir / "branches" / "1" / "branch.json").read_text())
    b2 = json.loads((run_dir / "branches" / "2" / "branch.json").read_text())
    assert (b1["from_step"], b1["to_step"], b1["checkpoint"]) == (5, 3, "step-000003")
    assert (b2["from_step"], b2["to_step"], b2["checkpoint"]) == (7, 3, "step-000003")
    # The step-6 checkpoint of branch 2 was moved, not overwritten by the step-6 checkpoint written after.
    moved = run_dir / "branches" / "2" / "checkpoints" / "step-000006"
    assert b2["moved"] == ["checkpoints/step-000006"] and (moved / "optimizer.pt").is_file()
    assert checkpoint.read_state(moved)[1]["step"] == 6
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    # The event stream holds every branch's steps with the rollback events between them.
    assert [e.step if e.type == "step" else e.type for e in events if e.type in ("step", "rollback")] == [
        1,
        2,
        3,
        4,
        5,
        "rollback",
        4,
        5,
        6,
        7,
        "rollback",
        4,
        5,
        6,
        7,
        8,
    ]


def test_rollback_with_a_new_lr_equals_a_resume_with_that_lr(tmp_path):
    events, b = run(
        make_cfg(tmp_path / "b", **KW), at={5: [Rollback("step-000003", {"learning_rate": 1e-3})]}
    )
    ckpt = b.run_dir / "checkpoints" / "step-000003"
    asked = config_mod.apply_overrides(checkpoint.read_config(ckpt), ["train.learning_rate=1e-3"])
    resumed, c = run(asked, resume_from=ckpt)
    after = of(events, "step")[5:]
    assert [e.step for e in after] == [4, 5, 6, 7, 8]
    rs = steps(resumed)
    assert [(e.loss, e.learning_rate) for e in after] == [
        (rs[s].loss, rs[s].learning_rate) for s in range(4, 9)
    ]
    wb, wc = weights(b), weights(c)
    for n in wb:
        assert torch.equal(wb[n], wc[n]), n
    roll = [c for c in of(events, "change") if "step" in c.changes][0]
    assert roll.changes == {"step": [5, 3], "learning_rate": [3e-3, 1e-3]} and roll.source == "user"
    res = of(resumed, "change")[0]
    assert res.changes == {"learning_rate": [3e-3, 1e-3]} and res.source == "resume" and res.step == 3
    # b's run folder has newer checkpoints than step 3: the resume went to a new folder naming it.
    assert c.run_dir != b.run_dir and of(resumed, "start")[0].parent == str(b.run_dir.resolve())


def test_rollback_restores_the_live_values_and_optimizer_of_the_checkpoint(tmp_path):
    at = {
        4: [Set({"optim": "sgd", "gradient_accumulation_steps": 2, "max_grad_norm": 0.5})],
        5: [Rollback("step-000003")],
    }
    events, t = run(make_cfg(tmp_path, **KW), at=at)
    assert type(t.optimizer).__name__ == "AdamW"
    assert t.cfg.train.optim == "adamw_torch" and t.cfg.train.max_grad_norm == 1.0
    assert [e.gradient_accumulation_steps for e in of(events, "step")][-5:] == [1] * 5
    # The change log is the checkpoint's plus the rollback: the sgd change belongs to the branch.
    assert [c["changes"] for c in t.change_log] == [{"step": [5, 3]}]
    ref, _ = run(make_cfg(tmp_path / "ref", **KW))
    assert [e.loss for e in of(events, "step")][-5:] == [e.loss for e in of(ref, "step")][3:]


def test_a_refused_rollback_is_one_error_and_changes_nothing(tmp_path):
    refused = [
        Rollback("step-000004"),
        Rollback("branches/1/checkpoints/step-000006"),
        Rollback("latest", {"seed": 7}),
        Rollback("latest", {"learning_rate": 5}),
    ]
    events, t = run(make_cfg(tmp_path, **KW), at={4: refused})
    assert [f"{e.message} ({e.advice})" for e in of(events, "error")] == [
        "rollback: this run has no checkpoint step-000004 (checkpoints: step-000003 or latest)",
        "rollback: 'branches/1/checkpoints/step-000006' is not a checkpoint of this run's trajectory (give a "
        "name under checkpoints/ (step-000200) or latest; resume a branch's checkpoint as a new run with "
        "--resume)",
        "a rollback cannot change train.seed (42 -> 7: changes the data order) (start a new run to change "
        f"it; resuming takes new live values ({', '.join(LIVE_KEYS)}, autopilot) and another output_dir)",
        "train.learning_rate=5.0 is out of range (train.learning_rate must be > 0 and < 1 (typical LoRA: "
        "1e-4 to 3e-4))",
    ]
    assert [e.step for e in of(events, "step")] == list(range(1, 9)) and not of(events, "rollback")
    assert not of(events, "change") and not (t.run_dir / "branches").exists()


def test_rollback_before_any_checkpoint_is_refused(tmp_path):
    events, _ = run(make_cfg(tmp_path, **KW), at={2: [Rollback("latest")]})
    assert of(events, "error")[0].message == "rollback: this run has no checkpoint yet"


def test_rollback_to_a_checkpoint_saved_on_request_and_at_the_last_boundary(tmp_path):
    # A save at step 2, a rollback to it from the last boundary (after step 8): the run goes on to 8 again.
    events, t = run(make_cfg(tmp_path, **KW), at={2: [Save()], 8: [Rollback("step-000002")]})
    assert [e.step for e in of(events, "step")][8:] == [3, 4, 5, 6, 7, 8]
    assert events[-1].status == "completed" and events[-1].step == 8
    assert json.loads((t.run_dir / "branches" / "1" / "branch.json").read_text())["from_step"] == 8


def test_the_rollback_command_parses_from_json():
    cmd = protocol.command_from_dict(
        {"cmd": "rollback", "checkpoint": "step-000200", "set": {"learning_rate": 5e-5}}
    )
    assert cmd == Rollback("step-000200", {"learning_rate": 5e-5})
    assert cmd.to_dict() == {"cmd": "rollback", "checkpoint": "step-000200", "set": {"learning_rate": 5e-5}}
    assert protocol.command_from_dict({"cmd": "rollback"}) == Rollback("latest")
    assert protocol.command_from_dict({"cmd": "rollback", "checkpoint": 200}) == Rollback("step-000200")
    with pytest.raises(ConfigError, match="command 'rollback' takes no to"):
        protocol.command_from_dict({"cmd": "rollback", "to": 3})
    with pytest.raises(ConfigError, match="rollback set=5 is not a mapping"):
        protocol.command_from_dict({"cmd": "rollback", "set": 5})


@pytest.mark.slow
def test_a_session_writes_the_branch_to_metrics_and_tensorboard_keeps_the_current_trajectory(tmp_path):
    import time

    from tunedeck.engine.session import TrainingSession

    session = TrainingSession(make_cfg(tmp_path, train__max_steps=12, train__save_steps=2), system_interval=0)
    session.start()
    sent = False
    deadline = time.time() + 120
    while session.alive and time.time() < deadline:
        for e in session.drain():
            if e.type == "step" and e.step == 4 and not sent:
                session.send({"cmd": "rollback", "checkpoint": "step-000002"})
                sent = True
        time.sleep(0.02)
    assert session.join(timeout=60) and session.end.status == "completed"
    records = [json.loads(x) for x in (session.run_dir / "metrics.jsonl").read_text().splitlines()]
    (i,) = [n for n, r in enumerate(records) if r["type"] == "rollback"]
    rb = records[i]
    assert rb["to_step"] == 2 and rb["checkpoint"] == "step-000002" and rb["branch"] == 1
    before = [r["step"] for r in records[:i] if r["type"] == "step"]
    after = [r for r in records[i:] if r["type"] == "step"]
    assert before == list(range(1, rb["from_step"] + 1)) and [r["step"] for r in after] == list(range(3, 13))
    branch = json.loads((session.run_dir / "branches" / "1" / "branch.json").read_text())
    assert (branch["from_step"], branch["to_step"]) == (rb["from_step"], 2)
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(session.run_dir / "tensorboard"))
    acc.Reload()
    kept = [r for r in records[:i] if r["type"] == "step" and r["step"] <= 2] + after
    scalars = acc.Scalars("train/loss")
    assert [s.step for s in scalars] == list(range(1, 13))
    assert [s.value for s in scalars] == [pytest.approx(r["loss"]) for r in kept]
