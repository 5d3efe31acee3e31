"""The autopilot's rules, each on a constructed loss curve: when it fires, what it does, how often."""

import json
import math
import queue

import pytest
import torch
from safetensors.torch import load_file

from tests.engine.helpers import make_cfg, of, run, steps
from tunedeck.engine import autopilot, checkpoint
from tunedeck.engine import config as config_mod
from tunedeck.engine.autopilot import Autopilot, Context
from tunedeck.engine.errors import ConfigError
from tunedeck.engine.protocol import Cancel, Rollback, Save, Set, Stop
from tunedeck.engine.trainer import Trainer

SMALL = dict(data__max_length=64, train__lr_scheduler_type="constant", train__learning_rate=3e-3)


def ctx(step, checkpoints=(), lr=1e-3):
    return Context(step=step, checkpoints=list(checkpoints), learning_rate=lr, lr_of=lambda s: 2e-3)


def feed(pilot, losses, start=1):
    """Observe ``losses`` from step ``start`` on; the firings of each boundary, by step."""
    out = {}
    for i, loss in enumerate(losses):
        step = start + i
        pilot.observe_step(step, loss)
        fired = pilot.decide(ctx(step, checkpoints=range(0, step + 1, 3)))
        if fired:
            out[step] = fired
    return out


# ---------------------------------------------------------------- the rules on their own


def test_loss_spike_rolls_back_two_steps_before_the_first_high_loss_and_scales_the_lr():
    pilot = Autopilot([{"rule": "loss_spike", "ratio": 2.0, "steps": 2, "window": 4, "max_firings": 1}])
    # Level 1.0; 2.5 at steps 10 and 11: fires after step 11. Checkpoints every 3 steps: 0, 3, 6, 9.
    fired = feed(pilot, [1.0] * 9 + [2.5, 2.5] + [1.0] * 3 + [2.5, 2.5, 2.5])
    assert list(fired) == [11]
    (f,) = fired[11]
    # Step 10's loss came from step 9's weights: the newest checkpoint at or before step 8 is step 6.
    assert f.commands == [Rollback("step-000006", {"learning_rate": 2e-3 * 0.5})]
    assert f.rule == "loss_spike" and f.reason == (
        "loss 2.5 above 2 x its smoothed level 1 for 2 steps since step 10"
    )
    # The second spike finds the rule at its limit: a note, no firing.
    assert pilot.notes == ["autopilot rule loss_spike has fired 1 time (its max_firings); it no longer acts"]


def test_a_short_spike_below_the_steps_does_not_fire():
    pilot = Autopilot([{"rule": "loss_spike", "ratio": 2.0, "steps": 2, "window": 4}])
    assert feed(pilot, [1.0] * 9 + [2.5] + [1.0] * 5 + [2.5]) == {}


def test_plateau_follows_reduce_lr_on_plateau_on_the_smoothed_loss():
    spec = {"rule": "plateau", "patience": 3, "threshold": 0.01, "cooldown": 2, "window": 3, "lr_scale": 0.5}
    pilot = Autopilot([spec])
    # Falls, then flat with noise: torch's ReduceLROnPlateau on the same smoothed values is the reference.
    losses = [3.0, 2.6, 2.3, 2.1, 2.0, 1.95] + [1.95 + 0.01 * ((i * 7) % 3 - 1) for i in range(30)]
    lr = 1e-3
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=0.5, patience=3, threshold=0.01, threshold_mode="rel", cooldown=2
    )
    level, expected, got = None, [], []
    for step, loss in enumerate(losses, start=1):
        level = loss if level is None else level + 0.5 * (loss - level)  # window 3: alpha 2 / (3 + 1)
        if step >= 3:  # the rule looks once a window of steps is smoothed
            before = opt.param_groups[0]["lr"]
            ref.step(level)
            if opt.param_groups[0]["lr"] < before:
                expected.append((step, opt.param_groups[0]["lr"]))
        pilot.observe_step(step, loss)
        for f in pilot.decide(Context(step, [], lr, lambda s, lr=lr: lr)):
            (cmd,) = f.commands
            lr = cmd.values["learning_rate"]
            got.append((step, lr))
    assert got == expected[:3] and len(got) == 3  # max_firings 3
    assert [lr for _, lr in got] == [5e-4, 2.5e-4, 1.25e-4]


def test_early_stopping_saves_each_new_best_and_goes_back_to_it():
    pilot = Autopilot([{"rule": "early_stopping", "patience": 2, "threshold": 0.01}])
    decided = {}
    for step, loss in [(2, 3.0), (4, 2.5), (6, 2.495), (8, 2.6)]:
        pilot.observe_eval(step, loss)
        decided[step] = pilot.decide(ctx(step, checkpoints=[2, 4]))
    assert [f.commands for f in decided[2]] == [[Save()]] and not decided[2][0].record
    assert [f.commands for f in decided[4]] == [[Save()]]
    assert decided[6] == []  # 2.495 is not better than 2.5 by more than 0.01
    (stop,) = decided[8]
    assert stop.commands == [Rollback("step-000004"), Stop()] and stop.record
    assert stop.reason == "eval_loss has not improved on 2.5 (step 4) for 2 evaluations"
    assert pilot.protected() == {4}


def test_nonfinite_acts_only_while_under_its_limit():
    pilot = Autopilot([{"rule": "nonfinite", "max_firings": 1, "lr_scale": 0.25}])
    assert pilot.nonfinite(7, float("nan"), 1.0)
    (f,) = pilot.decide(ctx(7, checkpoints=[3, 6]))
    assert f.commands == [Rollback("step-000003", {"learning_rate": 2e-3 * 0.25})]
    assert not pilot.nonfinite(9, float("inf"), 1.0)  # at its limit: the run pauses as without a rule
    # Without a checkpoint far enough back, only the learning rate is scaled.
    pilot = Autopilot([{"rule": "nonfinite"}])
    assert pilot.nonfinite(2, float("nan"), 1.0)
    (f,) = pilot.decide(ctx(2, checkpoints=[1], lr=1e-3))
    assert f.commands == [Set({"learning_rate": 5e-4})]
    assert f.reason.endswith("; no checkpoint before step 1: learning rate scaled only")


def test_a_rollback_restores_observations_but_never_lowers_a_firing_count():
    pilot = Autopilot([{"rule": "loss_spike", "window": 2}])
    feed(pilot, [1.0, 1.0, 1.0])
    saved = json.loads(json.dumps(pilot.state_dict()))
    pilot.rules[0].fired = 2
    pilot.rules[0].obs["level"] = 9.0
    pilot.load_state_dict(saved, keep_counts=True)
    assert pilot.rules[0].fired == 2 and pilot.rules[0].obs["level"] == pytest.approx(1.0)
    pilot.load_state_dict(saved)  # a resume: the checkpoint's count
    assert pilot.rules[0].fired == 0


@pytest.mark.parametrize(
    "value, message",
    [
        (
            "[{rule: spike}]",
            "train.autopilot[0] rule='spike' is not a known rule (rules: loss_spike, nonfinite, early_stopping, plateau)",
        ),
        (
            "[{ratio: 2}]",
            "train.autopilot[0] has no rule (rules: loss_spike, nonfinite, early_stopping, plateau)",
        ),
        (
            "[{rule: loss_spike, ratio: 0.5}]",
            "train.autopilot[0].ratio=0.5 is out of range (ratio must be > 1)",
        ),
        (
            "[{rule: plateau}, {rule: nonfinite, lr_scale: 2}]",
            "train.autopilot[1].lr_scale=2 is out of range (lr_scale must be in (0, 1])",
        ),
        (
            "[{rule: loss_spike, steps: 1.5}]",
            "train.autopilot[0].steps=1.5 is not a whole number (steps must be a whole number >= 1)",
        ),
        (
            "[{rule: early_stopping, max_firings: 2}]",
            "train.autopilot[0] (early_stopping) takes no 'max_firings' (early_stopping takes: name, enabled, patience, threshold)",
        ),
        (
            "[{rule: nonfinite}, {rule: nonfinite}]",
            "train.autopilot has two rules named 'nonfinite' (give one of them another name: name: ...)",
        ),
        (
            "{rule: plateau}",
            "train.autopilot={'rule': 'plateau'} is not a list of rules (e.g. [{rule: loss_spike, ratio: 2.0}, {rule: early_stopping, patience: 3}])",
        ),
    ],
)
def test_bad_rules_are_refused_with_one_line(value, message):
    with pytest.raises(ConfigError) as e:
        config_mod.apply_overrides(config_mod.Config(), [f"train.autopilot={value}"])
    assert e.value.one_line() == message


def test_rules_get_their_defaults_and_round_trip_through_yaml(tmp_path):
    cfg = config_mod.apply_overrides(config_mod.Config(), ["train.autopilot=[{rule: loss_spike, ratio: 3}]"])
    assert cfg.train.autopilot == [
        {
            "rule": "loss_spike",
            "name": "loss_spike",
            "enabled": True,
            "ratio": 3.0,
            "steps": 2,
            "window": 10,
            "lr_scale": 0.5,
            "max_firings": 2,
        }
    ]
    config_mod.save(cfg, tmp_path / "c.yaml")
    assert config_mod.load(tmp_path / "c.yaml").train.autopilot == cfg.train.autopilot


# ---------------------------------------------------------------- in a run


SPIKE = [{"rule": "loss_spike", "ratio": 1.3, "steps": 2, "window": 5, "max_firings": 1}]


def test_a_loss_spike_rolls_back_once_and_the_run_recovers_exactly(tmp_path):
    # A huge LR for step 13's update: the loss from step 14 on is high. Another at step 20, after the limit.
    huge = {12: [Set({"learning_rate": 0.9})], 13: [Set({"learning_rate": 3e-3})]}
    again = {20: [Set({"learning_rate": 0.9})], 21: [Set({"learning_rate": 1.5e-3})]}
    kw = dict(train__max_steps=24, train__save_steps=4, **SMALL)
    events, t = run(make_cfg(tmp_path / "a", train__autopilot=json.dumps(SPIKE), **kw), at={**huge, **again})
    (rb,) = of(events, "rollback")
    # The loss of steps 14 and 15 was high; the newest checkpoint at or before step 12 is 12 itself.
    assert (rb.from_step, rb.to_step, rb.checkpoint, rb.branch) == (15, 12, "step-000012", 1)
    (fired,) = [c for c in of(events, "change") if c.source == "autopilot"]
    assert fired.rule == "loss_spike" and fired.changes == {"step": [15, 12], "learning_rate": [3e-3, 1.5e-3]}
    assert fired.reason.startswith("loss ") and fired.reason.endswith("for 2 steps since step 14")
    level = None
    for e in of(events, "step")[:13]:  # the smoothed level the rule compared with (window 5: alpha 1/3)
        level = e.loss if level is None else level + (e.loss - level) / 3
    assert [e.loss > 1.3 * level for e in of(events, "step")[12:15]] == [False, True, True]
    # The second spike is past the limit: a warning, no second rollback, and the run completes.
    assert [w.message for w in of(events, "warning") if w.kind != "data"] == [
        "autopilot rule loss_spike has fired 1 time (its max_firings); it no longer acts"
    ]
    assert events[-1].status == "completed"
    # Recovered exactly: from step 12 on it is the run that set the LR to 1.5e-3 there, with no spike.
    ref, _ = run(make_cfg(tmp_path / "ref", **kw), at={12: [Set({"learning_rate": 1.5e-3})], **again})
    after = of(events, "step")[15:]
    r = steps(ref)
    assert [e.step for e in after] == list(range(13, 25))
    assert [e.loss for e in after] == [r[e.step].loss for e in after]


def test_a_nonfinite_loss_rolls_back_instead_of_pausing(tmp_path):
    rules = [{"rule": "nonfinite", "lr_scale": 0.5}]
    cfg = make_cfg(
        tmp_path, train__max_steps=10, train__save_steps=3, train__autopilot=json.dumps(rules), **SMALL
    )
    poisoned = []

    def poison(trainer):
        def hook(module, args, output):
            if trainer.step == 7 and not poisoned:  # the forward passes of step 8, once
                poisoned.append(trainer.step)
                output.loss = output.loss * float("nan")
            return output

        trainer.model.register_forward_hook(hook)

    events, t = run_with(cfg, poison)
    assert [w.kind for w in of(events, "warning") if w.kind != "data"] == ["nan"]
    assert not [e for e in of(events, "state") if e.state == "paused"]
    (rb,) = of(events, "rollback")
    assert (rb.from_step, rb.to_step) == (7, 6)
    (fired,) = [c for c in of(events, "change") if c.source == "autopilot"]
    assert fired.rule == "nonfinite" and fired.changes == {"step": [7, 6], "learning_rate": [3e-3, 1.5e-3]}
    assert fired.reason == "loss nan / grad norm nan at step 8 is not finite"
    assert [e.step for e in of(events, "step")] == [1, 2, 3, 4, 5, 6, 7, 7, 8, 9, 10]
    assert all(math.isfinite(e.loss) for e in of(events, "step")) and events[-1].status == "completed"


def test_a_nonfinite_loss_past_the_limit_pauses_as_without_a_rule(tmp_path):
    rules = [{"rule": "nonfinite", "max_firings": 1}]
    cfg = make_cfg(
        tmp_path, train__max_steps=10, train__save_steps=3, train__autopilot=json.dumps(rules), **SMALL
    )

    def poison(trainer):
        def hook(module, args, output):
            if trainer.step in (7, 8):  # step 8 every time it comes: the rollback meets it again
                output.loss = output.loss * float("nan")
            return output

        trainer.model.register_forward_hook(hook)

    events, t = run_with(cfg, poison, on_pause=Cancel())
    assert len(of(events, "rollback")) == 1 and events[-1].status == "cancelled"
    assert [e.state for e in of(events, "state")][-2:] == ["paused", "finished"]
    warnings = [w.message for w in of(events, "warning") if w.kind != "data"]
    assert warnings[0].endswith("the batch is skipped and the autopilot acts on it")
    assert "paused before the optimizer step" in warnings[1]
    assert warnings[2] == "autopilot rule nonfinite has fired 1 time (its max_firings); it no longer acts"


def test_early_stopping_stops_on_the_best_eval_and_keeps_its_checkpoint(tmp_path):
    rules = [{"rule": "early_stopping", "patience": 3}]
    cfg = make_cfg(
        tmp_path,
        train__max_steps=40,
        data__eval_fraction=0.02,
        train__eval_steps=2,
        train__save_steps=2,
        train__save_total_limit=1,
        train__autopilot=json.dumps(rules),
        **SMALL,
    )
    events, t = run(cfg, at={12: [Set({"learning_rate": 0.9})], 13: [Set({"learning_rate": 3e-3})]})
    evals = [(e.step, e.eval_loss) for e in of(events, "eval")]
    best, bad, stop = math.inf, 0, None
    for step, loss in evals:  # HF's EarlyStoppingCallback, threshold 0
        if loss < best:
            best, best_step, bad = loss, step, 0
        else:
            bad += 1
            if bad >= 3:
                stop = step
                break
    assert stop is not None and evals[-1][0] == stop  # no evaluation after the stop
    (rb,) = of(events, "rollback")
    assert (rb.from_step, rb.to_step) == (stop, best_step)
    (fired,) = [c for c in of(events, "change") if c.source == "autopilot"]
    assert fired.changes == {"step": [stop, best_step], "state": ["running", "stopping"]}
    assert events[-1].status == "stopped" and events[-1].step == best_step
    # final/ holds the best evaluation's weights: those of its checkpoint, kept whatever the limit pruned.
    best_dir = t.run_dir / "checkpoints" / checkpoint.step_dir_name(best_step)
    final = load_file(t.run_dir / "final" / "adapter_model.safetensors")
    kept = load_file(best_dir / "adapter_model.safetensors")
    assert final.keys() == kept.keys() and all(torch.equal(final[k], kept[k]) for k in final)
    assert [p.name for p in (t.run_dir / "checkpoints").iterdir()] == [best_dir.name]


def test_plateau_lowers_the_lr_in_a_run_as_reduce_lr_on_plateau_would(tmp_path):
    rules = [
        {"rule": "plateau", "patience": 2, "threshold": 0.05, "window": 4, "lr_scale": 0.5, "max_firings": 2}
    ]
    cfg = make_cfg(tmp_path, train__max_steps=30, train__autopilot=json.dumps(rules), **SMALL)
    events, _ = run(cfg)
    fired = [c for c in of(events, "change") if c.source == "autopilot"]
    assert len(fired) == 2
    # The reference: torch's scheduler fed the smoothed losses the run reported.
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=3e-3)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2, threshold=0.05)
    level, expected = None, []
    for e in of(events, "step"):
        level = e.loss if level is None else level + 0.4 * (e.loss - level)
        if e.step >= 4:
            before = opt.param_groups[0]["lr"]
            ref.step(level)
            if opt.param_groups[0]["lr"] < before:
                expected.append((e.step, [before, opt.param_groups[0]["lr"]]))
    assert [(c.step, c.changes["learning_rate"]) for c in fired] == expected[:2]
    lrs = {e.step: e.learning_rate for e in of(events, "step")}
    assert lrs[fired[1].step + 1] == pytest.approx(0.75e-3) and lrs[30] == pytest.approx(0.75e-3)


def test_rules_switch_off_and_on_live(tmp_path):
    rules = SPIKE + [{"rule": "nonfinite"}]
    cfg = make_cfg(
        tmp_path, train__max_steps=20, train__save_steps=4, train__autopilot=json.dumps(rules), **SMALL
    )
    off = {"autopilot": {"loss_spike": False}}
    at = {10: [Set(off)], 12: [Set({"learning_rate": 0.9})], 13: [Set({"learning_rate": 3e-3})]}
    events, t = run(cfg, at=at)
    assert not of(events, "rollback")  # the spike came, the rule was off
    change = of(events, "change")[0]
    assert change.source == "user" and change.step == 10
    old, new = change.changes["autopilot"]
    assert [r["enabled"] for r in old] == [True, True] and [r["enabled"] for r in new] == [False, True]
    assert t.cfg.train.autopilot[0]["enabled"] is False
    with pytest.raises(ConfigError, match="autopilot has no rule named 'spikes'"):
        autopilot.updated(t.cfg.train.autopilot, {"spikes": True})


def run_with(cfg, prepare, on_pause=None):
    """Run with ``prepare(trainer)`` called once the model is loaded; ``on_pause`` is sent when it pauses."""
    events = []
    commands = queue.Queue()
    real_setup = Trainer.setup

    class Hooked(Trainer):
        def setup(self):
            real_setup(self)
            prepare(self)

    def emit(e):
        events.append(e)
        if on_pause is not None and e.type == "state" and e.state == "paused":
            commands.put(on_pause)

    t = Hooked(cfg, emit, commands)
    events.append(t.run())
    return events, t
