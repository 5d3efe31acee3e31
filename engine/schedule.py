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

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, cast

import torch

from tunedeck.engine.config import SCHEDULER_NAMES
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
    """The multiplier of HF's schedule ``kind`` at (possibly fractional) step ``x``: transformers' own
    lambda, built once per shape."""
    return float(_hf_lambda(kind, warmup, total, base_lr, _frozen(kw))(x))


def _frozen(kw: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(kw.items()))


@functools.lru_cache(maxsize=128)
def _hf_lambda(
    kind: str, warmup: float, total: float, base_lr: float, kw: tuple[tuple[str, Any], ...]
) -> Callable[[float], float]:
    """``transformers.get_scheduler``'s lambda for one shape (on a throwaway optimizer, whose LR is
    the base some shapes read: ``lr_end``, ``min_lr``). Refuses settings the shape does not take."""
    from transformers import SchedulerType, get_scheduler
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION

    if kind not in SCHEDULER_NAMES:
        raise ConfigError(
            f"train.lr_scheduler_type={kind!r} is not a known schedule",
            f"use one of {', '.join(SCHEDULER_NAMES)}",
        )
    func = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(kind)]
    params = inspect.signature(cast(Callable[..., Any], func)).parameters
    takes = [n for n in params if n not in _NOT_SETTINGS]
    unknown = [k for k, _ in kw if k not in takes]
    if unknown:
        raise ConfigError(
            f"train.lr_scheduler_kwargs has {unknown[0]!r}, which the {kind} schedule does not take",
            f"{kind} takes {', '.join(takes) or 'no settings'}",
        )
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    try:
        # Steps on the virtual axis are fractional; transformers' lambdas compute in floats anyway.
        sched = get_scheduler(
            kind,
            opt,
            num_warmup_steps=warmup,  # type: ignore[arg-type]
            num_training_steps=total,  # type: ignore[arg-type]
            scheduler_specific_kwargs=dict(kw),
        )
        lam = sched.lr_lambdas[0]
        # Every branch of the shape once now, so a bad value fails here and not after the warm-up.
        for x in (0.0, warmup / 2, warmup, (warmup + total) / 2, total):
            float(lam(x))
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ConfigError(
            f"train.lr_scheduler_kwargs={dict(kw)!r} does not work with {kind}: {str(e).splitlines()[0]}",
            "fix or remove the value (see transformers' get_scheduler)",
        ) from None
    return lam


# Arguments of transformers' schedule functions that are not user settings.
_NOT_SETTINGS = ("optimizer", "num_warmup_steps", "num_training_steps", "last_epoch")


def check(kind: str, kwargs: dict[str, Any], total_steps: int, warmup_steps: int, base_lr: float) -> None:
    """Refuse, before anything loads, a schedule or settings that would fail while the run goes."""
    kw = {**default_kwargs(kind, total_steps), **kwargs}
    multiplier(kind, 0.0, warmup=float(warmup_steps), total=float(total_steps), base_lr=base_lr, kw=kw)


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
