"""The autopilot: rules in ``train.autopilot`` that watch the loss and act through the same commands a
user could send (``rollback``, ``set``, ``save``, ``stop``).

Rules (each a mapping with ``rule:``; ``name`` defaults to the rule, ``enabled`` to true):

- ``loss_spike``: the loss is above ``ratio`` x its smoothed level (an exponential average over about
  ``window`` steps) for ``steps`` steps in a row: roll back to the newest checkpoint at least two steps
  before the first high loss (the loss of step s is measured with the weights of step s-1, which may
  already be the bad ones) and set the learning rate to that checkpoint's x ``lr_scale``.
- ``nonfinite``: a loss or gradient norm that is not finite: the same rollback and scale, instead of
  pausing. Without a checkpoint far enough back, only the learning rate is scaled (the bad batch was
  skipped and the weights were not updated).
- ``early_stopping`` (HF's ``early_stopping_patience`` / ``early_stopping_threshold``): the eval loss
  has not improved by more than ``threshold`` for ``patience`` evaluations: roll back to the best
  evaluation's checkpoint and stop, so ``final/`` holds the best weights. Each new best is saved (a
  ``save``) unless a checkpoint of that step exists, and kept whatever ``save_total_limit`` prunes.
- ``plateau`` (torch's ReduceLROnPlateau, mode min, relative threshold, on the smoothed loss): no
  improvement for more than ``patience`` steps: scale the learning rate by ``lr_scale`` (not below
  ``min_lr``), then wait ``cooldown`` steps.

A rule acts at most ``max_firings`` times in a run (early stopping once: it ends the run). Its
observations are checked after each step and evaluation; it acts at the next step boundary. Each firing
is a ``change`` event with source ``autopilot``, the rule's name and its reason. The rules' state is kept
in checkpoints; a rollback takes the observations back to the checkpoint's but never the firing counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunedeck.engine import checkpoint, rollback
from tunedeck.engine.errors import ConfigError
from tunedeck.engine.protocol import Command, Rollback, Save, Set, Stop

# name -> (kind, default, check, allowed) for each setting of each rule
_Spec = tuple[type, Any, Callable[[Any], bool], str]
_SCALE: _Spec = (float, 0.5, lambda v: 0 < v <= 1, "in (0, 1]")
_FIRINGS: _Spec = (int, 2, lambda v: v >= 1, "a whole number >= 1")
_WINDOW: _Spec = (int, 10, lambda v: v >= 1, "a whole number >= 1")
RULES: dict[str, dict[str, _Spec]] = {
    "loss_spike": {
        "ratio": (float, 2.0, lambda v: v > 1, "> 1"),
        "steps": (int, 2, lambda v: v >= 1, "a whole number >= 1"),
        "window": _WINDOW,
        "lr_scale": _SCALE,
        "max_firings": _FIRINGS,
    },
    "nonfinite": {"lr_scale": _SCALE, "max_firings": _FIRINGS},
    "early_stopping": {
        "patience": (int, 3, lambda v: v >= 1, "a whole number >= 1"),
        "threshold": (float, 0.0, lambda v: v >= 0, ">= 0"),
    },
    "plateau": {
        "patience": (int, 10, lambda v: v >= 0, "a whole number >= 0"),
        "threshold": (float, 1e-4, lambda v: 0 <= v < 1, "in [0, 1)"),
        "cooldown": (int, 0, lambda v: v >= 0, "a whole number >= 0"),
        "min_lr": (float, 0.0, lambda v: v >= 0, ">= 0"),
        "window": _WINDOW,
        "lr_scale": _SCALE,
        "max_firings": (int, 3, lambda v: v >= 1, "a whole number >= 1"),
    },
}
KEY = "autopilot"  # the train key, live-changeable with a set
EXAMPLE = "e.g. [{rule: loss_spike, ratio: 2.0}, {rule: early_stopping, patience: 3}]"


def check_rules(value: Any) -> list[dict[str, Any]]:
    """``train.autopilot`` validated: each rule complete with its defaults, in a fixed key order."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value) if value.strip() else []
        except yaml.YAMLError:
            raise ConfigError(
                f"train.autopilot={value!r} is not YAML", f"give a list of rules, {EXAMPLE}"
            ) from None
    if value is None:
        value = []
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"train.autopilot={value!r} is not a list of rules", EXAMPLE)
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        out.append(_check_rule(f"train.autopilot[{i}]", item))
    names = [r["name"] for r in out]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(
                f"train.autopilot has two rules named {name!r}", "give one of them another name: name: ..."
            )
    return out


def _check_rule(where: str, item: Any) -> dict[str, Any]:
    known = ", ".join(RULES)
    if not isinstance(item, dict):
        raise ConfigError(f"{where}={item!r} is not a rule", f"give a mapping with rule: one of {known}")
    kind = item.get("rule")
    if kind not in RULES:
        what = f"rule={kind!r} is not a known rule" if "rule" in item else "has no rule"
        raise ConfigError(f"{where} {what}", f"rules: {known}")
    spec = RULES[kind]
    takes = ("rule", "name", "enabled", *spec)
    extra = [k for k in item if k not in takes]
    if extra:
        raise ConfigError(f"{where} ({kind}) takes no {extra[0]!r}", f"{kind} takes: {', '.join(takes[1:])}")
    name = item.get("name", kind)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}.name={name!r} is not a name", "give a short text, e.g. name: spikes")
    enabled = item.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where}.enabled={enabled!r} is not true or false", "give enabled: true or false")
    rule: dict[str, Any] = {"rule": kind, "name": name.strip(), "enabled": enabled}
    for key, (kind_of, default, ok, allowed) in spec.items():
        raw = item.get(key, default)
        value = _number(raw, kind_of)
        if value is None:
            what = "a whole number" if kind_of is int else "a number"
            raise ConfigError(f"{where}.{key}={raw!r} is not {what}", f"{key} must be {allowed}")
        if not ok(value):
            raise ConfigError(f"{where}.{key}={raw!r} is out of range", f"{key} must be {allowed}")
        rule[key] = value
    return rule


def _number(raw: Any, kind: type) -> float | int | None:
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    if kind is int:
        return int(value) if value.is_integer() else None
    return value


def updated(rules: list[dict[str, Any]], value: Any) -> list[dict[str, Any]]:
    """The rules after a live ``set`` of ``autopilot``: a list replaces them; a mapping of rule names to
    true/false switches those rules on or off."""
    if not isinstance(value, dict):
        return check_rules(value)
    names = [r["name"] for r in rules]
    for name, on in value.items():
        if name not in names:
            raise ConfigError(
                f"autopilot has no rule named {name!r}", f"rules of this run: {', '.join(names) or 'none'}"
            )
        if not isinstance(on, bool):
            raise ConfigError(f"autopilot {name}={on!r} is not true or false", f'e.g. {{"{name}": false}}')
    return check_rules([{**r, "enabled": value.get(r["name"], r["enabled"])} for r in rules])


# ---------------------------------------------------------------- at run time


@dataclass
class Firing:
    """What a rule does at a step boundary: ``commands``, applied in order. ``record``: whether it is a
    firing (a change event, counted against the limit) or upkeep (saving a new best eval)."""

    rule: str
    reason: str
    commands: list[Command]
    record: bool = True


@dataclass
class Context:
    """What a rule may look at when it acts: the step, the steps of the run's checkpoints (on the
    current trajectory) and the base learning rate stored in the checkpoint of a step."""

    step: int
    checkpoints: list[int]
    learning_rate: float
    lr_of: Callable[[int], float]

    @classmethod
    def of_run(cls, step: int, run_dir: Path, learning_rate: float) -> Context:
        def lr_of(s: int) -> float:
            return checkpoint.read_config(
                run_dir / "checkpoints" / checkpoint.step_dir_name(s)
            ).train.learning_rate

        return cls(step, rollback.checkpoint_steps(run_dir), learning_rate, lr_of)


@dataclass
class _Rule:
    spec: dict[str, Any]
    fired: int = 0
    exhausted_said: bool = False
    # observations; reset by a rollback to a checkpoint that holds none
    obs: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def kind(self) -> str:
        return str(self.spec["rule"])

    def limit(self) -> int:
        return int(self.spec.get("max_firings", 1))


def _ema(level: float | None, x: float, window: int) -> float:
    alpha = 2.0 / (window + 1)
    return x if level is None else level + alpha * (x - level)


class Autopilot:
    """The rules of a run and what each has seen. Nothing here touches the model: rules return commands."""

    def __init__(self, rules: list[dict[str, Any]]) -> None:
        self.rules: list[_Rule] = []
        self.notes: list[str] = []  # warnings for the trainer to emit
        self.configure(rules)

    def configure(self, rules: list[dict[str, Any]]) -> None:
        """New rule settings; a rule that keeps its name and kind keeps its state and firing count."""
        old = {(r.name, r.kind): r for r in self.rules}
        self.rules = []
        for spec in check_rules(rules):
            rule = old.get((spec["name"], spec["rule"])) or _Rule(spec)
            rule.spec = spec
            self.rules.append(rule)

    def _active(self, kind: str) -> list[_Rule]:
        return [r for r in self.rules if r.kind == kind and r.spec["enabled"]]

    # ------------------------------------------------------------ observations

    def observe_step(self, step: int, loss: float) -> None:
        for r in self._active("loss_spike"):
            self._spike(r, step, loss)
        for r in self._active("plateau"):
            self._plateau(r, step, loss)

    def _spike(self, r: _Rule, step: int, loss: float) -> None:
        o, s = r.obs, r.spec
        if o.get("trigger"):
            return
        level, seen = o.get("level"), int(o.get("seen", 0))
        if level is not None and seen >= s["window"] and loss > s["ratio"] * level:
            o["above"] = int(o.get("above", 0)) + 1
            o.setdefault("first", step)
            if o["above"] >= s["steps"]:
                o["trigger"] = (
                    f"loss {loss:.4g} above {s['ratio']:g} x its smoothed level {level:.4g} "
                    f"for {o['above']} steps since step {o['first']}"
                )
            return  # a high loss does not raise the level it is compared with
        o.pop("first", None)
        o["above"] = 0
        o["level"], o["seen"] = _ema(level, loss, s["window"]), seen + 1

    def _plateau(self, r: _Rule, step: int, loss: float) -> None:
        o, s = r.obs, r.spec
        level = _ema(o.get("level"), loss, s["window"])
        o["level"], o["seen"] = level, int(o.get("seen", 0)) + 1
        if o["seen"] < s["window"]:
            return  # the smoothed level needs a window of steps before it means anything
        best = o.get("best")
        if best is None or level < best * (1 - s["threshold"]):
            o["best"], o["bad"] = level, 0
        else:
            o["bad"] = int(o.get("bad", 0)) + 1
        if o.get("cooldown", 0) > 0:
            o["cooldown"] -= 1
            o["bad"] = 0
        if o["bad"] > s["patience"]:
            o["trigger"] = (
                f"smoothed loss {level:.4g} not below its best {o['best']:.4g} by {s['threshold']:g} "
                f"(relative) for {o['bad']} steps"
            )

    def observe_eval(self, step: int, eval_loss: float) -> None:
        for r in self._active("early_stopping"):
            o, s = r.obs, r.spec
            if o.get("last_eval") == step or o.get("trigger"):
                continue  # one evaluation per step counts
            o["last_eval"] = step
            best = o.get("best")
            if best is None or eval_loss < best - s["threshold"]:
                o["best"], o["best_step"], o["bad"] = eval_loss, step, 0
                o["save"] = step
                continue
            o["bad"] = int(o.get("bad", 0)) + 1
            if o["bad"] >= s["patience"]:
                o["trigger"] = (
                    f"eval_loss has not improved on {best:.4g} (step {o['best_step']}) "
                    f"for {o['bad']} evaluations"
                )

    def nonfinite(self, step: int, loss: float, grad_norm: float) -> bool:
        """A non-finite loss at ``step``: True when a rule will act on it (so the run need not pause)."""
        for r in self._active("nonfinite"):
            if r.fired < r.limit():
                r.obs["trigger"] = f"loss {loss} / grad norm {grad_norm} at step {step} is not finite"
                r.obs["first"] = step
                return True
            self._exhausted(r)
        return False

    def pending(self) -> bool:
        """Whether a rule has something to do at the next boundary."""
        return any("trigger" in r.obs or "save" in r.obs for r in self.rules)

    def protected(self) -> set[int]:
        """Steps whose checkpoints must survive pruning: the best evaluations of early stopping."""
        return {int(r.obs["best_step"]) for r in self.rules if "best_step" in r.obs}

    # ------------------------------------------------------------ acting

    def decide(self, ctx: Context) -> list[Firing]:
        """What the rules do at this boundary (each trigger is consumed, acted on or not)."""
        out: list[Firing] = []
        for r in self.rules:
            o = r.obs
            save = o.pop("save", None)
            if save is not None and save == ctx.step:
                out.append(Firing(r.name, f"new best eval_loss {o['best']:.4g}", [Save()], record=False))
            trigger = o.pop("trigger", None)
            if trigger is None or not r.spec["enabled"]:
                continue
            if r.fired >= r.limit():
                self._exhausted(r)
                continue
            firing = self._act(r, trigger, ctx)
            if firing is not None:
                r.fired += 1
                out.append(firing)
        return out

    def _act(self, r: _Rule, reason: str, ctx: Context) -> Firing | None:
        o, s = r.obs, r.spec
        if r.kind == "plateau":
            o["bad"], o["cooldown"] = 0, s["cooldown"]
            new = max(ctx.learning_rate * s["lr_scale"], s["min_lr"])
            if new >= ctx.learning_rate:
                return None  # already at min_lr: nothing to lower
            return Firing(r.name, reason, [Set(values={"learning_rate": new})])
        if r.kind == "early_stopping":
            best = int(o["best_step"])
            if best in ctx.checkpoints:
                back: list[Command] = [Rollback(checkpoint=_dir(best))]
            else:
                back, reason = [], f"{reason}; no checkpoint of step {best}: stopped where it is"
            return Firing(r.name, reason, [*back, Stop()])
        # loss_spike and nonfinite: back before the first bad loss, with a lower learning rate
        first = int(o.pop("first", ctx.step))
        o["above"] = 0
        fit = [c for c in ctx.checkpoints if c <= first - 2]
        if not fit:
            new = ctx.learning_rate * s["lr_scale"]
            reason = f"{reason}; no checkpoint before step {first - 1}: learning rate scaled only"
            return Firing(r.name, reason, [Set(values={"learning_rate": new})])
        to = max(fit)
        new = ctx.lr_of(to) * s["lr_scale"]
        return Firing(r.name, reason, [Rollback(checkpoint=_dir(to), values={"learning_rate": new})])

    def _exhausted(self, r: _Rule) -> None:
        if not r.exhausted_said:
            r.exhausted_said = True
            self.notes.append(
                f"autopilot rule {r.name} has fired {r.fired} time{'s' if r.fired != 1 else ''} (its max_firings); "
                "it no longer acts"
            )

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {r.name: {"fired": r.fired, "obs": _plain(r.obs)} for r in self.rules}

    def load_state_dict(self, state: dict[str, Any], keep_counts: bool = False) -> None:
        """Observations and firing counts from a checkpoint. ``keep_counts`` (a rollback): a count never
        goes down, so a rule that fired since cannot fire again beyond its limit."""
        for r in self.rules:
            saved = state.get(r.name, {})
            r.obs = {k: v for k, v in dict(saved.get("obs", {})).items() if k not in ("trigger", "save")}
            fired = int(saved.get("fired", 0))
            r.fired = max(r.fired, fired) if keep_counts else fired


def _plain(obs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obs.items() if isinstance(v, (int, float, str)) or v is None}


def _dir(step: int) -> str:
    return f"step-{step:06d}"
