"""The step plan: HF's step counts, micro-batches as a DataLoader cuts them, and live recounts."""

from __future__ import annotations

import math

import pytest

from tunedeck.engine.plan import Slice, StepPlan


def hf_counts(n: int, b: int, ga: int, epochs: float) -> tuple[int, int]:
    """(micro-batches, optimizer steps) as counted before the plan existed: ceil(epochs x per_epoch)."""
    per_epoch = math.ceil(n / b)
    micro = math.ceil(epochs * per_epoch)
    return micro, math.ceil(micro / ga)


def consume(plan: StepPlan) -> list[list[Slice]]:
    steps = []
    while not plan.done:
        steps.append(plan.next_step())
        plan.finish_step()
    return steps


@pytest.mark.parametrize(
    ("n", "b", "ga", "epochs"),
    [(100, 8, 1, 1), (100, 8, 3, 2), (7, 4, 2, 1.5), (50, 64, 2, 3), (33, 5, 4, 0.3)],
)
def test_epoch_budget_counts_like_before_and_cuts_like_a_dataloader(n, b, ga, epochs):
    plan = StepPlan.create(n, b, ga, epochs, max_steps=-1)
    micro, total = hf_counts(n, b, ga, epochs)
    assert plan.total_steps == total and plan.micro_batches_left() == micro
    slices = [s for step in consume(plan) for s in step]
    assert len(slices) == micro and plan.micro_batches_left() == 0
    per_epoch = math.ceil(n / b)
    for k, s in enumerate(slices):
        epoch, i = divmod(k, per_epoch)
        assert s == Slice(epoch, i * b, min((i + 1) * b, n))


def test_steps_budget_keeps_the_micro_batches_and_wraps_epochs():
    plan = StepPlan.create(10, 4, 2, 1, max_steps=5)
    assert plan.total_steps == 5 and plan.micro_batches_left() == 10
    slices = [s for step in consume(plan) for s in step]
    assert [(s.epoch, s.start, s.stop) for s in slices[:4]] == [(0, 0, 4), (0, 4, 8), (0, 8, 10), (1, 0, 4)]
    assert len(slices) == 10 and plan.step == 5


def test_a_new_batch_size_skips_and_repeats_nothing():
    plan = StepPlan.create(20, 4, 1, 2, max_steps=-1)
    taken = [plan.next_step() for _ in range(3)]
    for _ in taken:
        plan.finish_step()
    change = plan.set_batch_size(3)
    # 12 examples seen; 28 left: 8 of epoch 0 in 3 micro-batches (3, 3, 2), then 20 in 7 -> 10 steps left.
    assert change == {"total_steps": [10, 13]} and plan.total_steps == 13
    rest = consume(plan)
    covered: dict[int, list[int]] = {0: [], 1: []}
    for s in [x for step in taken + rest for x in step]:
        covered[s.epoch] += range(s.start, s.stop)
    assert covered == {0: list(range(20)), 1: list(range(20))}
    assert [s.stop - s.start for step in rest for s in step][:3] == [3, 3, 2]


def test_accumulation_recounts_the_steps_from_the_micro_batches_left():
    plan = StepPlan.create(64, 4, 1, 1, max_steps=12)
    for _ in range(4):
        plan.next_step()
        plan.finish_step()
    assert plan.set_accumulation(2) == {"total_steps": [12, 8]}
    assert [len(step) for step in consume(plan)] == [2, 2, 2, 2]


def test_a_plan_round_trips_through_its_state():
    plan = StepPlan.create(30, 4, 2, 1.5, max_steps=-1)
    plan.next_step()
    plan.finish_step()
    again = StepPlan.from_state(plan.state_dict())
    assert again == plan and consume(again) == consume(plan)


def test_a_micro_batch_count_of_version_0_1_replays_to_the_same_position():
    fresh = StepPlan.create(30, 4, 2, 2, max_steps=-1)
    live = StepPlan.from_state(fresh.state_dict())
    for _ in range(5):
        live.next_step()
        live.finish_step()
    old_state = {
        "micro": 10,
        "total_micro": 16,
        "step": 5,
        "total_steps": 8,
        "gradient_accumulation_steps": 2,
    }
    assert StepPlan.from_micro_count(fresh, old_state) == live
