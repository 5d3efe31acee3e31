"""Out of memory in a step heals: smaller micro-batches, the same effective batch, the same step redone.

The faults are real ``torch.OutOfMemoryError``s raised in the model's forward pass by the documented
``TUNEDECK_FAULT_OOM_TOKENS`` hook. With make_cfg's data (batch 4, seed 42) the padded micro-batches
of steps 1-8 hold 84, 92, 96, 84, 104, 124, 76, 116 tokens, and no batch of 2 more than 62.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.engine.helpers import make_cfg, of, run, steps
from tunedeck.engine import oom
from tunedeck.engine.protocol import Set


def weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize(
    ("batch", "accumulation", "expected"),
    [
        (4, 1, (2, 2)),
        (8, 3, (4, 6)),
        (6, 1, (3, 2)),
        (3, 1, (1, 3)),
        (5, 2, (2, 5)),
        (1, 4, None),
        (2, 4096, None),
    ],
)
def test_a_smaller_batch_keeps_the_effective_batch(batch, accumulation, expected):
    assert oom.smaller_batch(batch, accumulation) == expected


def test_a_healed_first_step_equals_a_run_started_at_the_smaller_batch(tmp_path, monkeypatch):
    """The fault hits the second micro-batch of step 1, after the first one's forward and backward have
    drawn dropout masks and left gradients: both must be undone for the redo to equal a fresh start."""
    kw = dict(train__max_steps=4, lora__dropout=0.1)
    monkeypatch.setenv(oom.FAULT_ENV, "90")  # step 1 in two micro-batches of 4: 84 tokens, then 92
    healed_events, healed = run(
        make_cfg(
            tmp_path / "a", **kw, train__per_device_train_batch_size=4, train__gradient_accumulation_steps=2
        )
    )
    monkeypatch.delenv(oom.FAULT_ENV)
    small_events, small = run(
        make_cfg(
            tmp_path / "b", **kw, train__per_device_train_batch_size=2, train__gradient_accumulation_steps=4
        )
    )
    (change,) = of(healed_events, "change")
    assert change.step == 0 and change.source == "auto"
    assert change.changes == {"per_device_train_batch_size": [4, 2], "gradient_accumulation_steps": [2, 4]}
    assert change.reason.startswith(
        "out of memory in step 1 (TUNEDECK_FAULT_OOM_TOKENS=90: a micro-batch of 92"
    )
    assert "the same effective batch of 8; the step is redone from the same examples" in change.reason
    a, b = steps(healed_events), steps(small_events)
    assert sorted(a) == list(range(1, 5)) and [a[s].loss for s in a] == [b[s].loss for s in b]
    assert max_diff(weights(healed), weights(small)) == 0.0
    assert healed.plan.seen == small.plan.seen == 32


def test_a_step_healed_mid_run_is_redone_from_its_own_examples(tmp_path, monkeypatch):
    # No dropout: its masks depend on the micro-batch shapes, so only then are splits comparable.
    kw = dict(train__max_steps=8, lora__dropout=0.0, train__save_steps=6)
    monkeypatch.setenv(oom.FAULT_ENV, "100")  # step 5's 104 tokens are the first over it
    healed_events, healed = run(make_cfg(tmp_path / "a", **kw))
    monkeypatch.delenv(oom.FAULT_ENV)
    same = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}
    live_events, live = run(make_cfg(tmp_path / "b", **kw), at={4: [Set(same)]})
    plain_events, plain = run(make_cfg(tmp_path / "c", **kw))
    small_events, small = run(
        make_cfg(
            tmp_path / "d", **kw, train__per_device_train_batch_size=2, train__gradient_accumulation_steps=2
        )
    )
    (change,) = of(healed_events, "change")
    assert (change.step, change.source) == (4, "auto") and "out of memory in step 5" in change.reason
    h = steps(healed_events)
    # No step lost or repeated: 1..8 once each, the accumulation doubled from the redone step 5 on.
    assert sorted(h) == list(range(1, 9)) and len(of(healed_events, "step")) == 8
    assert [h[s].gradient_accumulation_steps for s in h] == [1] * 4 + [2] * 4
    assert healed.plan.seen == plain.plan.seen == 32
    # The same as a user making that change at that boundary, bit for bit.
    assert [h[s].loss for s in h] == [e.loss for e in of(live_events, "step")]
    assert max_diff(weights(healed), weights(live)) == 0.0
    # Steps 1-4 as the unhealed run; the update of a step is the same in any split, up to fp32 rounding
    # (summed in another order), which Adam's division by the root of tiny second moments magnifies:
    # measured 1.6e-5 at most against a run at batch 2 from the start, ~0.5% of one step's 3e-3.
    p = steps(plain_events)
    assert [h[s].loss for s in range(1, 5)] == [p[s].loss for s in range(1, 5)]
    assert max(abs(h[s].loss - p[s].loss) for s in h) < 1e-5
    lr = 3e-3
    assert max_diff(weights(healed), weights(plain)) < 0.02 * lr
    assert max_diff(weights(healed), weights(small)) < 0.02 * lr
    # The change is in the checkpoint, so a resume goes on at the smaller batch.
    ckpt = healed.run_dir / "checkpoints" / "step-000006"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["plan"]["batch_size"], state["plan"]["accumulation"]) == (2, 2)
    assert state["change_log"][0]["source"] == "auto" and "out of memory" in state["change_log"][0]["reason"]
    assert "per_device_train_batch_size: 2" in (ckpt / "config.yaml").read_text()


def test_down_to_batch_1_then_checkpointing_then_the_advice(tmp_path, monkeypatch):
    monkeypatch.setenv(oom.FAULT_ENV, "10")  # no example fits
    events, trainer = run(make_cfg(tmp_path, train__max_steps=4))
    changes = of(events, "change")
    assert [c.changes for c in changes] == [
        {"per_device_train_batch_size": [4, 2], "gradient_accumulation_steps": [1, 2]},
        {"per_device_train_batch_size": [2, 1], "gradient_accumulation_steps": [2, 4]},
        {"gradient_checkpointing": [False, True]},
    ]
    assert all(c.source == "auto" and c.step == 0 for c in changes)
    assert "at batch 1: activations are recomputed" in changes[2].reason
    assert trainer.model.is_activation_checkpointing
    (err,) = of(events, "error")
    assert err.kind == "oom" and err.message.startswith(
        "out of memory in step 1 at batch 1 with gradient checkpointing (TUNEDECK_FAULT_OOM_TOKENS=10"
    )
    assert "data.max_length" in err.advice and "load_in_4bit" in err.advice
    assert events[-1].status == "failed" and events[-1].step == 0 and not of(events, "step")


def test_out_of_memory_in_the_optimizer_update_is_not_redone(tmp_path, monkeypatch):
    """The update may have changed some weights already: redoing the step would apply it twice."""
    from tunedeck.engine.trainer import Trainer

    real_setup = Trainer._setup_optimizer

    def setup(self, total):
        real_setup(self, total)
        real_step = self.optimizer.step

        def step(*a, **kw):
            if self.step == 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
            return real_step(*a, **kw)

        self.optimizer.step = step

    monkeypatch.setattr(Trainer, "_setup_optimizer", setup)
    events, _ = run(make_cfg(tmp_path, train__max_steps=5))
    (err,) = of(events, "error")
    assert err.kind == "oom" and err.message.startswith("out of memory in the optimizer update of step 3")
    assert "adamw_8bit" in err.advice and not of(events, "change") and events[-1].step == 2


def test_a_bad_fault_value_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(oom.FAULT_ENV, "lots")
    events, _ = run(make_cfg(tmp_path, train__max_steps=2))
    (err,) = of(events, "error")
    assert err.message == "TUNEDECK_FAULT_OOM_TOKENS='lots' is not a whole number"
    assert err.advice == "unset TUNEDECK_FAULT_OOM_TOKENS, or give a token count"
