"""The learning-rate range test: its curve and suggestions, and a run that is exactly as it was after it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.engine.helpers import make_cfg, of, run, steps
from tunedeck.engine import cli, lr_find
from tunedeck.engine.errors import ConfigError
from tunedeck.engine.protocol import FindLR, Pause, Resume, command_from_dict


def test_the_sweep_is_exponential_from_start_to_end():
    lrs = lr_find.learning_rates(FindLR(start_lr=1e-6, end_lr=1e-2, steps=5))
    assert lrs == pytest.approx([1e-6, 1e-5, 1e-4, 1e-3, 1e-2], rel=1e-12)


def test_suggestions_on_a_known_curve():
    """Loss 5 - 2 tanh(log10(lr) + 3) up to lr 1e-1, then rising: steepest at 1e-3, lowest at 1e-1."""
    lrs = lr_find.learning_rates(FindLR(start_lr=1e-6, end_lr=1.0, steps=61))
    losses = [5 - 2 * math.tanh(math.log10(lr) + 3) if lr <= 0.1 else 3.0 + 40 * (lr - 0.1) for lr in lrs]
    smoothed = lr_find.smooth(losses, 61)
    steepest, min_div_10 = lr_find.suggest(lrs, smoothed)
    assert steepest == pytest.approx(1e-3, rel=0.13)  # the grid's step is 10^0.1, a factor of 1.26
    lowest = min(range(61), key=lambda i: smoothed[i])
    assert min_div_10 == lrs[lowest] / 10 and 0.04 < lrs[lowest] <= 0.1  # smoothing rounds the corner


def test_smoothing_is_centred_so_it_does_not_lag():
    step = [6.0] * 10 + [4.0] * 10
    smoothed = lr_find.smooth(step, 20)  # one point each side
    assert smoothed[9] == pytest.approx(16 / 3) and smoothed[10] == pytest.approx(14 / 3)
    assert smoothed[:8] == [6.0] * 8 and smoothed[12:] == [4.0] * 8


def test_a_run_with_finds_in_it_equals_the_same_run_without(tmp_path):
    """A find before the first step and one while paused after step 3; a third, sent while the run
    trains, is refused. Dropout on, so the RNG must be put back too."""
    kw = dict(train__max_steps=6, lora__dropout=0.1)
    plain, p = run(make_cfg(tmp_path / "a", **kw))
    events, t = run(
        make_cfg(tmp_path / "b", **kw),
        at={
            0: [FindLR(steps=8)],
            3: [Pause(), FindLR(start_lr=1e-5, end_lr=1e-1, steps=10), Resume()],
            4: [FindLR(steps=5)],
        },
    )
    a, b = steps(plain), steps(events)
    assert sorted(b) == list(range(1, 7))
    assert [b[s].loss for s in b] == [a[s].loss for s in a]
    assert [b[s].learning_rate for s in b] == [a[s].learning_rate for s in a]
    wa = {n: x for n, x in p.model.named_parameters() if x.requires_grad}
    wb = {n: x for n, x in t.model.named_parameters() if x.requires_grad}
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    assert p.plan.state_dict() == t.plan.state_dict()
    first, second = of(events, "lr_find")
    assert (first.step, second.step) == (0, 3)
    assert first.lrs == pytest.approx(lr_find.learning_rates(FindLR(steps=8)), rel=1e-12)
    assert second.lrs[0] == pytest.approx(1e-5) and len(second.lrs) == len(second.losses) == 10
    assert all(math.isfinite(x) for x in second.losses) and second.stopped == "completed"
    assert second.suggestion is not None and 1e-5 <= second.suggestion <= 1e-1
    saved = json.loads((t.run_dir / "lr_find.json").read_text())
    assert (
        saved["step"] == 3 and saved["losses"] == second.losses and saved["suggestion"] == second.suggestion
    )
    assert second.path == str(t.run_dir / "lr_find.json")
    (refused,) = of(events, "error")
    assert refused.message == "find_lr: the run is training"
    assert refused.advice == "send pause first (find_lr runs before the first step or while paused)"


def test_the_sweep_stops_when_the_loss_diverges(tmp_path):
    """Full fine-tuning (the head trains, so the logits can grow) up to a learning rate of 10: the loss
    blows up, the sweep stops, and the run after it is as it would have been."""
    kw = dict(lora__enabled=False, train__max_steps=2)
    events, _ = run(make_cfg(tmp_path / "a", **kw), at={0: [FindLR(start_lr=1e-4, end_lr=10.0, steps=30)]})
    plain, _ = run(make_cfg(tmp_path / "b", **kw))
    (found,) = of(events, "lr_find")
    assert found.stopped == "diverged" and len(found.lrs) < 30
    assert all(math.isfinite(x) for x in found.losses) and found.losses[-1] > 4 * min(found.losses)
    assert found.suggestion is not None and found.suggestion < found.lrs[-1]
    assert [e.loss for e in of(events, "step")] == [e.loss for e in of(plain, "step")]


def test_the_cli_finds_prints_and_writes_and_does_not_train(tmp_path, capsys):
    code = cli.main(
        [
            "--find-lr",
            "--find-lr-steps",
            "12",
            "--find-lr-start",
            "1e-5",
            "--find-lr-end",
            "0.1",
            "--set",
            "train.per_device_train_batch_size=4",
            "--output-dir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    (run_dir,) = tmp_path.iterdir()
    saved = json.loads((run_dir / "lr_find.json").read_text())
    assert saved["steps"] == 12 and saved["start_lr"] == 1e-5 and saved["end_lr"] == 0.1
    assert len(saved["lrs"]) == len(saved["losses"]) == 12
    line = (
        f"lr_find: suggested learning_rate {saved['suggestion']:.2e} (steepest descent of the smoothed loss)"
    )
    assert line in out
    assert f"use it: --set train.learning_rate={saved['suggestion']:.2e}" in out
    assert out.strip().splitlines()[-1] == f"completed at step 0 -> {run_dir / 'lr_find.json'}"
    assert not (run_dir / "final").exists() and not (run_dir / "checkpoints").exists()
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["type"] for e in events if e["type"] in ("step", "lr_find", "end")] == ["lr_find", "end"]


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ({"cmd": "find_lr", "steps": 2}, "find_lr steps=2 is out of range"),
        ({"cmd": "find_lr", "start_lr": 1e-2, "end_lr": 1e-3}, "find_lr start_lr=0.01 is out of range"),
        ({"cmd": "find_lr", "steps": 10.5}, "find_lr steps=10.5 is not a whole number"),
        ({"cmd": "find_lr", "end_lr": "big"}, "find_lr end_lr='big' is not a number"),
    ],
)
def test_bad_find_lr_values_are_refused_in_one_line(command, message):
    with pytest.raises(ConfigError) as e:
        command_from_dict(command)
    assert e.value.message == message and e.value.advice


def test_the_cli_refuses_a_bad_range_before_loading(tmp_path, capsys):
    assert cli.main(["--find-lr", "--find-lr-steps", "3", "--output-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "tunedeck-train: error: find_lr steps=3 is out of range (give a whole number from 5 to 1000)"
    )
    assert not any(tmp_path.iterdir())
