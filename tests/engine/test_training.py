"""The loop against numbers: loss goes down, accumulation is exact, LRs follow transformers."""

import pytest
import torch
from transformers import get_scheduler

from tests.engine.helpers import make_cfg, of, run


def test_loss_decreases_on_the_demo(tmp_path):
    cfg = make_cfg(
        tmp_path,
        train__max_steps=40,
        train__per_device_train_batch_size=16,
        train__lr_scheduler_type="cosine",
        train__warmup_ratio=0.03,
    )
    events, _ = run(cfg)
    losses = [e.loss for e in of(events, "step")]
    assert len(losses) == 40
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert first > 5.0  # ln(259) ~ 5.56: the tiny model starts knowing nothing
    assert last < first - 1.0
    end = events[-1]
    assert end.type == "end" and end.status == "completed" and end.step == 40


def test_accumulation_equals_a_bigger_batch(tmp_path):
    """batch 2 x accumulation 4 == batch 8 x accumulation 1: same losses, same gradients.

    SGD, so the weights differ exactly as much as the gradients do (Adam would divide tiny
    float differences by tiny second moments)."""
    a_events, a = run(
        make_cfg(
            tmp_path / "a",
            train__per_device_train_batch_size=8,
            train__optim="sgd",
            train__gradient_accumulation_steps=1,
            train__max_steps=4,
        )
    )
    b_events, b = run(
        make_cfg(
            tmp_path / "b",
            train__per_device_train_batch_size=2,
            train__optim="sgd",
            train__gradient_accumulation_steps=4,
            train__max_steps=4,
        )
    )
    la = [e.loss for e in of(a_events, "step")]
    lb = [e.loss for e in of(b_events, "step")]
    assert la == pytest.approx(lb, rel=1e-5)
    wa = {n: p for n, p in a.model.named_parameters() if p.requires_grad}
    wb = {n: p for n, p in b.model.named_parameters() if p.requires_grad}
    worst = max(float((wa[n].detach() - wb[n].detach()).abs().max()) for n in wa)
    assert worst < 1e-7
    grad_norms = [e.grad_norm for e in of(a_events, "step")]
    assert grad_norms == pytest.approx([e.grad_norm for e in of(b_events, "step")], rel=1e-5)
    ga = {e.gradient_accumulation_steps for e in of(b_events, "step")}
    assert ga == {4}


def test_unchanged_run_uses_the_learning_rates_of_get_scheduler(tmp_path):
    cfg = make_cfg(
        tmp_path,
        train__max_steps=12,
        train__lr_scheduler_type="cosine",
        train__warmup_steps=3,
        train__learning_rate=2e-3,
    )
    events, _ = run(cfg)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2e-3)
    sched = get_scheduler("cosine", opt, num_warmup_steps=3, num_training_steps=12)
    expected = []
    for _ in range(12):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [e.learning_rate for e in of(events, "step")] == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_total_steps_from_epochs(tmp_path):
    cfg = make_cfg(
        tmp_path,
        train__max_steps=-1,
        train__num_train_epochs=1,
        data__eval_fraction=0.9,
        train__per_device_train_batch_size=64,
        train__gradient_accumulation_steps=2,
    )
    events, t = run(cfg)
    start = of(events, "start")[0]
    train_n = start.data["train_examples"]
    micro = -(-train_n // 64)
    assert start.total_steps == -(-micro // 2)
    assert of(events, "step")[-1].epoch == pytest.approx(1.0)
    assert t.plan.seen == train_n and t.plan.micro_batches_left() == 0
