"""Learning-rate schedules by HF ``lr_scheduler_type`` name, re-anchorable while a run goes.

An unchanged run gives exactly the learning rates of ``transformers.get_scheduler`` (the LR of
optimizer step n is ``base_lr * f(n - 1)``). Live changes work on a *virtual* step axis that
spans the run as first planned (``total`` steps):

- a new base LR scales the multiplier: the shape is kept;
- a new schedule type starts a *segment* at the current position that begins at the current
  LR (no jump, no second warm-up) and ends where the run ends;
- a new accumulation changes the *stride*: the remaining real steps are spread over the
  remaining virtual axis, so the progress fraction carries on.
"""

from __future__ import annotations

import math
from typing import Any

from tunedeck.engine.errors import ConfigError


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    """HF's rule: ``warmup_steps`` when set, else ``ceil(total * warmup_ratio)``."""
    return warmup_steps if warmup_steps > 0 else math.ceil(total_steps * warmup_ratio)


def default_kwargs(kind: str, total_steps: int) -> dict[str, Any]:
    """Settings HF requires the user to pass for some schedules, given sensible defaults here."""
    if kind == "cosine_with_min_lr":
        return {"min_lr_rate": 0.1}
    if kind == "warmup_stable_decay":
        return {"num_decay_steps": max(1, round(0.1 * total_steps))}
    return {}


def multiplier(
    kind: str, x: float, *, warmup: float, total: float, base_lr: float, kw: dict[str, Any]
) -> float:
    """The HF lambda of ``kind`` at (possibly fractional) step ``x``; same formulas, same defaults."""

    def ramp() -> float:
        return x / max(1.0, warmup)

    if kind == "constant":
        return 1.0
    if kind == "constant_with_warmup":
        return ramp() if x < warmup else 1.0
    if kind == "linear":
        if x < warmup:
            return ramp()
        return max(0.0, (total - x) / max(1.0, total - warmup))
    if kind in ("cosine", "cosine_with_min_lr"):
        if kind == "cosine_with_min_lr" and "min_lr" in kw:
            min_rate = kw["min_lr"] / base_lr
        else:
            min_rate = kw.get("min_lr_rate", 0.0)
        if x < warmup:
            return ramp()
        progress = (x - warmup) / max(1.0, total - warmup)
        factor = 0.5 * (1.0 + math.cos(math.pi * float(kw.get("num_cycles", 0.5)) * 2.0 * progress))
        return max(0.0, factor * (1 - min_rate) + min_rate)
    if kind == "cosine_with_restarts":
        if x < warmup:
            return ramp()
        progress = (x - warmup) / max(1.0, total - warmup)
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(kw.get("num_cycles", 1)) * progress) % 1.0))))
    if kind == "polynomial":
        lr_end, power = float(kw.get("lr_end", 1e-7)), float(kw.get("power", 1.0))
        if x < warmup:
            return ramp()
        if x > total:
            return lr_end / base_lr
        pct_remaining = 1 - (x - warmup) / (total - warmup)
        return ((base_lr - lr_end) * pct_remaining**power + lr_end) / base_lr
    if kind == "inverse_sqrt":
        if x < warmup:
            return ramp()
        timescale = kw.get("timescale") or warmup or 10_000
        return 1.0 / math.sqrt((x + timescale - warmup) / timescale)
    if kind == "warmup_stable_decay":
        return _wsd(x, warmup=warmup, total=total, kw=kw)
    raise ConfigError(
        f"train.lr_scheduler_type={kind!r} is not a known schedule",
        "use constant, linear, cosine, cosine_with_restarts, polynomial, inverse_sqrt, "
        "cosine_with_min_lr, constant_with_warmup or warmup_stable_decay",
    )


def _wsd(x: float, *, warmup: float, total: float, kw: dict[str, Any]) -> float:
    decay = float(kw.get("num_decay_steps", max(1, round(0.1 * total))))
    stable = float(kw.get("num_stable_steps", total - warmup - decay))
    min_ratio = float(kw.get("min_lr_ratio", 0.0))
    cycles = float(kw.get("num_cycles", 0.5))

    def curve(kind: str, p: float, rising: bool) -> float:
        if kind == "linear":
            return p if rising else 1.0 - p
        if kind == "cosine":
            return (
                0.5 * (1.0 - math.cos(math.pi * p))
                if rising
                else 0.5 * (1.0 + math.cos(math.pi * cycles * 2.0 * p))
            )
        if kind == "1-sqrt":
            return 1.0 - math.sqrt(1.0 - p) if rising else 1.0 - math.sqrt(p)
        raise ConfigError(f"warmup_stable_decay type {kind!r} is unknown", "use linear, cosine or 1-sqrt")

    if x < warmup:
        f = curve(kw.get("warmup_type", "linear"), x / max(1.0, warmup), True)
        return max(0.0, f * (1.0 - min_ratio) + min_ratio)
    if x < warmup + stable:
        return 1.0
    if x < warmup + stable + decay:
        f = curve(kw.get("decay_type", "cosine"), (x - warmup - stable) / max(1.0, decay), False)
        return max(0.0, f * (1.0 - min_ratio) + min_ratio)
    return min_ratio


class LRSchedule:
    """The LR of every optimizer step, with live re-anchoring. Its state is plain JSON."""

    def __init__(
        self,
        kind: str,
        base_lr: float,
        total_steps: int,
        warmup_steps: int,
        kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.base_lr = float(base_lr)
        self.total = float(total_steps)
        self.kwargs = {**default_kwargs(kind, total_steps), **(kwargs or {})}
        # One segment: a shape on [start, total] scaled by ``scale`` (the multiplier it starts from).
        self.segment: dict[str, Any] = {
            "kind": kind,
            "start": 0.0,
            "warmup": float(warmup_steps),
            "scale": 1.0,
            "kwargs": dict(self.kwargs),
        }
        self.pos = 0.0  # virtual position of the next optimizer step
        self.stride = 1.0
        self.steps_taken = 0
        multiplier(
            kind, 0.0, warmup=float(warmup_steps), total=self.total, base_lr=self.base_lr, kw=self.kwargs
        )

    @property
    def kind(self) -> str:
        return self.segment["kind"]

    def _mult_at(self, x: float) -> float:
        s = self.segment
        return s["scale"] * multiplier(
            s["kind"],
            x - s["start"],
            warmup=s["warmup"],
            total=self.total - s["start"],
            base_lr=self.base_lr,
            kw=s["kwargs"],
        )

    def lr(self) -> float:
        """The LR for the next optimizer step."""
        return self.base_lr * self._mult_at(self.pos)

    def last_lr(self) -> float:
        """The LR of the last step taken (of the next one before any step)."""
        x = self.pos - self.stride if self.steps_taken else self.pos
        return self.base_lr * self._mult_at(x)

    def advance(self) -> None:
        self.pos += self.stride
        self.steps_taken += 1

    def set_base_lr(self, lr: float) -> None:
        self.base_lr = float(lr)

    def switch(self, kind: str, kwargs: dict[str, Any] | None = None) -> None:
        """A new shape for the rest of the run, starting from the current LR."""
        kw = {**default_kwargs(kind, max(1, round(self.total - self.pos))), **(kwargs or {})}
        multiplier(kind, 0.0, warmup=0.0, total=max(1.0, self.total - self.pos), base_lr=self.base_lr, kw=kw)
        if not self.steps_taken:
            # Nothing has run yet: the new type simply replaces the old, with the configured warm-up.
            self.segment = {**self.segment, "kind": kind, "kwargs": kw}
            return
        scale = self.last_lr() / self.base_lr
        # Anchored at the last step taken, so the new curve continues from the LR in use, with no jump.
        self.segment = {
            "kind": kind,
            "start": self.pos - self.stride,
            "warmup": 0.0,
            "scale": scale,
            "kwargs": kw,
        }

    def respread(self, remaining_steps: int) -> None:
        """Spread ``remaining_steps`` real steps over the rest of the virtual axis."""
        remaining_virtual = self.total - self.pos
        if remaining_steps > 0 and remaining_virtual > 0:
            self.stride = remaining_virtual / remaining_steps

    def state_dict(self) -> dict[str, Any]:
        return {
            "base_lr": self.base_lr,
            "total": self.total,
            "kwargs": self.kwargs,
            "segment": self.segment,
            "pos": self.pos,
            "stride": self.stride,
            "steps_taken": self.steps_taken,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base_lr = float(state["base_lr"])
        self.total = float(state["total"])
        self.kwargs = dict(state["kwargs"])
        self.segment = dict(state["segment"])
        self.pos = float(state["pos"])
        self.stride = float(state["stride"])
        self.steps_taken = int(state["steps_taken"])
