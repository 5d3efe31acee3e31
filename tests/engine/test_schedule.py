import math

import pytest
import torch
from transformers import get_scheduler

from tunedeck.engine.config import SCHEDULER_NAMES
from tunedeck.engine.schedule import LRSchedule, warmup_steps_for

KWARGS = {
    "cosine_with_min_lr": {"min_lr_rate": 0.1},
    "warmup_stable_decay": {"num_decay_steps": 10},
    "polynomial": {"power": 2.0, "lr_end": 1e-5},
    "cosine_with_restarts": {"num_cycles": 2},
}


def hf_lrs(kind: str, base: float, total: int, warmup: int) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    sched = get_scheduler(
        kind,
        opt,
        num_warmup_steps=warmup,
        num_training_steps=total,
        scheduler_specific_kwargs=KWARGS.get(kind),
    )
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("kind", SCHEDULER_NAMES)
def test_every_schedule_matches_transformers(kind):
    base, total, warmup = 3e-4, 50, 5
    s = LRSchedule(kind, base, total, warmup, KWARGS.get(kind))
    ours = []
    for _ in range(total):
        ours.append(s.lr())
        s.advance()
    assert ours == pytest.approx(hf_lrs(kind, base, total, warmup), rel=1e-12, abs=1e-15)


def test_warmup_ratio_rounds_up_like_hf():
    assert warmup_steps_for(100, 0, 0.03) == 3
    assert warmup_steps_for(10, 0, 0.03) == 1
    assert warmup_steps_for(100, 7, 0.5) == 7


def test_new_base_lr_keeps_the_shape_scaled():
    a, b = LRSchedule("cosine", 1e-3, 40, 4), LRSchedule("cosine", 1e-3, 40, 4)
    for _ in range(10):
        a.advance()
        b.advance()
    b.set_base_lr(2e-3)
    for _ in range(30):
        assert b.lr() == pytest.approx(2 * a.lr(), rel=1e-12)
        a.advance()
        b.advance()


def test_switching_shape_starts_from_the_current_lr():
    s = LRSchedule("cosine", 1e-3, 40, 4)
    for _ in range(20):
        s.advance()
    current = s.last_lr()
    s.switch("constant")
    for _ in range(20):
        assert s.lr() == pytest.approx(current, rel=1e-12)
        s.advance()


def test_switch_to_linear_decays_from_the_current_lr_to_zero_with_no_jump_and_no_warmup():
    s = LRSchedule("constant_with_warmup", 1e-3, 40, 4)
    for _ in range(10):
        s.advance()
    current = s.last_lr()
    assert current == pytest.approx(1e-3)
    s.switch("linear")
    lrs = []
    for _ in range(30):
        lrs.append(s.lr())
        s.advance()
    # Anchored at step 10 (x=9): 30 steps left of 31 on the segment -> first LR is current * 30/31.
    assert lrs[0] == pytest.approx(current * 30 / 31, rel=1e-12)
    assert all(x > y for x, y in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(current * 1 / 31, rel=1e-12)


def test_respread_keeps_the_progress_fraction():
    # 40 planned steps; after 10, the remaining 30 become 15 (accumulation doubled).
    s = LRSchedule("cosine", 1e-3, 40, 0)
    for _ in range(10):
        s.advance()
    s.respread(15)
    lrs = []
    for _ in range(15):
        lrs.append(s.lr())
        s.advance()
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * (10 + 2 * k) / 40)) for k in range(15)]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_state_round_trips():
    s = LRSchedule("cosine", 1e-3, 40, 4)
    for _ in range(7):
        s.advance()
    s.switch("linear")
    s.respread(11)
    t = LRSchedule("constant", 1.0, 1, 0)
    t.load_state_dict(s.state_dict())
    for _ in range(11):
        assert t.lr() == s.lr()
        s.advance()
        t.advance()


@pytest.mark.parametrize(
    ("kind", "kwargs", "message"),
    [
        (
            "cosine",
            {"foo": 1},
            "train.lr_scheduler_kwargs has 'foo', which the cosine schedule does not take",
        ),
        (
            "polynomial",
            {"power": "x"},
            "train.lr_scheduler_kwargs={'power': 'x'} does not work with polynomial: unsupported operand",
        ),
        ("nope", {}, "train.lr_scheduler_type='nope' is not a known schedule"),
    ],
)
def test_settings_a_schedule_cannot_use_are_refused_before_the_run(kind, kwargs, message):
    from tunedeck.engine.errors import ConfigError
    from tunedeck.engine.schedule import check

    with pytest.raises(ConfigError) as e:
        check(kind, kwargs, total_steps=100, warmup_steps=3, base_lr=1e-4)
    assert e.value.message.startswith(message)
