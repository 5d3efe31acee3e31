"""What a run has reported so far, as growable numpy buffers: one per plotted series. No Qt here.

The bridge hands every event to :meth:`RunHistory.add`; the plots read ``series.view`` (a view of
the filled part, no copy) at most ~20 times a second, so a step costs a few appends and a redraw
costs what numpy and pyqtgraph need for the visible part, however many points there are.
A past run is read back from its ``metrics.jsonl`` with :meth:`RunHistory.load`.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunedeck.engine.protocol import (
    ChangeEvent,
    CheckpointEvent,
    EndEvent,
    ErrorEvent,
    EvalEvent,
    Event,
    RollbackEvent,
    SampleEvent,
    StartEvent,
    StateEvent,
    StepEvent,
    SystemEvent,
    WarningEvent,
    event_from_dict,
)


class Series:
    """A float64 array that grows by doubling; ``view`` is the filled part (no copy)."""

    __slots__ = ("_data", "_n", "gen")

    def __init__(self, capacity: int = 1024) -> None:
        self._data = np.empty(max(16, capacity), dtype=np.float64)
        self._n = 0
        self.gen = 0  # bumped by clear(), so derived data (an Envelope) knows to start over

    def __len__(self) -> int:
        return self._n

    def _reserve(self, extra: int) -> None:
        need = self._n + extra
        if need > len(self._data):
            cap = len(self._data)
            while cap < need:
                cap *= 2
            grown = np.empty(cap, dtype=np.float64)
            grown[: self._n] = self._data[: self._n]
            self._data = grown

    def append(self, value: float | None) -> None:
        if self._n == len(self._data):
            self._reserve(1)
        self._data[self._n] = math.nan if value is None else value
        self._n += 1

    def extend(self, values: Any) -> None:
        arr = np.asarray(values, dtype=np.float64).ravel()
        self._reserve(len(arr))
        self._data[self._n : self._n + len(arr)] = arr
        self._n += len(arr)

    def clear(self) -> None:
        self._n = 0
        self.gen += 1

    @property
    def view(self) -> np.ndarray:
        return self._data[: self._n]

    def last(self, default: float = math.nan) -> float:
        return float(self._data[self._n - 1]) if self._n else default


# Series fed by step events: name in the history -> field of StepEvent.
STEP_FIELDS = {
    "loss": "loss",
    "lr": "learning_rate",
    "grad_norm": "grad_norm",
    "tokens": "tokens",
    "tokens_per_s": "tokens_per_s",
    "mem_allocated": "mem_allocated_mb",
    "mem_reserved": "mem_reserved_mb",
    "mem_peak": "mem_peak_mb",
    "epoch": "epoch",
    "elapsed": "elapsed_s",
    "step_time": "step_time_s",
    "accum": "gradient_accumulation_steps",
}
SYSTEM_FIELDS = {
    "rss": "rss_mb",
    "cpu": "cpu_percent",
    "gpu_used": "gpu_mem_used_mb",
    "gpu_total": "gpu_mem_total_mb",
    "gpu_util": "gpu_util",
}
# Read by the window next to each system event (the machine's memory, which the engine does not
# report): NaN where nobody measured it, as in a run read back from its folder.
HOST_FIELDS = ("host_used", "host_total")

# What the x axis can count.
X_MODES = {"step": "optimizer step", "tokens": "tokens seen", "time": "wall time"}


@dataclass
class Change:
    step: int
    changes: dict[str, list[Any]]
    source: str
    rule: str = ""  # the autopilot rule that made it
    reason: str = ""

    def label(self) -> str:
        return ", ".join(f"{k} {fmt_number(v[0])}→{fmt_number(v[1])}" for k, v in self.changes.items())


@dataclass
class Branch:
    """Steps a rollback left behind (``to_step+1..from_step``), kept to be drawn faded."""

    number: int | None
    from_step: int
    to_step: int
    checkpoint: str
    steps: np.ndarray
    loss: np.ndarray
    lr: np.ndarray


@dataclass
class RunHistory:
    """Everything one run reported, ready to plot."""

    run_id: str = ""
    run_dir: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    total_steps: int = 0
    state: str = ""
    status: str = ""  # end status, empty while running
    output: str | None = None
    started: float = 0.0  # unix time of the start event
    ended: float = 0.0  # unix time of the end event
    changes: list[Change] = field(default_factory=list)
    checkpoints: list[tuple[int, str]] = field(default_factory=list)
    branches: list[Branch] = field(default_factory=list)  # abandoned by rollbacks, oldest first
    samples: list[SampleEvent] = field(default_factory=list)
    problems: list[Event] = field(default_factory=list)  # warnings and errors
    version: int = 0  # bumped on every change; the plots redraw when it moved

    def __post_init__(self) -> None:
        self.steps = Series()
        self.series: dict[str, Series] = {name: Series() for name in STEP_FIELDS}
        self.tokens_seen = Series()  # running sum of the steps' tokens, for the x axis
        self.eval_steps = Series(64)
        self.eval_loss = Series(64)
        self.sys_steps = Series(256)  # the last optimizer step when the sample was taken
        self.system: dict[str, Series] = {name: Series(256) for name in (*SYSTEM_FIELDS, *HOST_FIELDS)}
        self.nonzero: set[str] = set()  # series that reported something other than 0 / None
        self.last_step: StepEvent | None = None
        self.last_system: SystemEvent | None = None

    # ------------------------------------------------------------------ feeding

    def add(self, ev: Event) -> None:
        self.version += 1
        match ev:
            case StepEvent():
                self.steps.append(ev.step)
                for name, attr in STEP_FIELDS.items():
                    v = getattr(ev, attr)
                    self.series[name].append(v)
                    if v and name not in self.nonzero:
                        self.nonzero.add(name)
                self.tokens_seen.append(self.tokens_seen.last(0.0) + (ev.tokens or 0))
                if ev.total_steps:
                    self.total_steps = ev.total_steps
                self.last_step = ev
            case SystemEvent():
                self.sys_steps.append(self.steps.last(0.0))
                for name, attr in SYSTEM_FIELDS.items():
                    v = getattr(ev, attr)
                    self.system[name].append(v)
                    if v and name not in self.nonzero:
                        self.nonzero.add(name)
                for name in HOST_FIELDS:
                    self.system[name].append(None)
                self.last_system = ev
            case EvalEvent(step=step, eval_loss=loss):
                self.eval_steps.append(step)
                self.eval_loss.append(loss)
            case ChangeEvent(step=step, changes=changes, source=source, rule=rule, reason=reason):
                self.changes.append(Change(step, dict(changes), source, rule, reason))
            case RollbackEvent():
                self._branch_off(ev)
            case StartEvent():
                self._started(ev)
            case StateEvent(state=state):
                self.state = state
            case CheckpointEvent(step=step, path=path):
                self.checkpoints.append((step, path))
            case SampleEvent():
                self.samples.append(ev)
            case WarningEvent() | ErrorEvent():
                self.problems.append(ev)
            case EndEvent(status=status, output=output):
                self.status, self.output, self.ended = status, output, ev.time
            case _:
                pass  # progress, and event types of newer versions: nothing to plot

    def _started(self, ev: StartEvent) -> None:
        resumed_at = int(ev.step or 0)
        if resumed_at and len(self.steps) and self.steps.last() > resumed_at:
            # A resumed run appends to the same metrics.jsonl from its checkpoint's step on:
            # drop the steps after it, which the resumed run redoes.
            self.truncate(resumed_at)
        self.run_id, self.run_dir = ev.run_id, ev.run_dir
        self.config, self.model, self.data = ev.config, ev.model, ev.data
        self.total_steps = ev.total_steps
        if not self.started:
            self.started = ev.time
        if not self.changes:  # a resumed run carries its change log: show those markers too
            for c in ev.changes or []:
                if isinstance(c, dict) and "step" in c:
                    self.changes.append(
                        Change(
                            int(c["step"]),
                            dict(c.get("changes") or {}),
                            str(c.get("source", "user")),
                            str(c.get("rule", "")),
                            str(c.get("reason", "")),
                        )
                    )

    def set_host_memory(self, used_mb: float, total_mb: float) -> None:
        """The machine's memory, read by the window when the last system event arrived."""
        if len(self.sys_steps):
            self.system["host_used"].view[-1] = used_mb
            self.system["host_total"].view[-1] = total_mb
            self.nonzero.update(HOST_FIELDS)
            self.version += 1

    def truncate(self, step: float) -> None:
        """Forget everything reported after optimizer step ``step``."""

        def cut(xs: Series, ys: list[Series]) -> None:
            keep = int(np.searchsorted(xs.view, step, side="right"))
            for s in (xs, *ys):
                if len(s) > keep:
                    vals = s.view[:keep].copy()
                    s.clear()
                    s.extend(vals)

        cut(self.steps, [*self.series.values(), self.tokens_seen])
        cut(self.eval_steps, [self.eval_loss])
        cut(self.sys_steps, list(self.system.values()))
        self.changes = [c for c in self.changes if c.step <= step]
        self.checkpoints = [c for c in self.checkpoints if c[0] <= step]
        self.version += 1

    def _branch_off(self, ev: RollbackEvent) -> None:
        """The steps after ``to_step`` become a branch; the run goes on from ``to_step``."""
        xs = self.steps.view
        keep = int(np.searchsorted(xs, ev.to_step, side="right")) if len(xs) else 0
        # A branch starts at its fork point, so its faded line joins the run's.
        start = max(0, keep - 1)
        self.branches.append(
            Branch(
                ev.branch,
                ev.from_step,
                ev.to_step,
                ev.checkpoint,
                xs[start:].copy(),
                self.series["loss"].view[start:].copy(),
                self.series["lr"].view[start:].copy(),
            )
        )
        self.truncate(ev.to_step)

    def extend(self, events: list[Event]) -> None:
        for ev in events:
            self.add(ev)

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def device(self) -> str:
        """Where the run trains ("cpu", "cuda:0" ...), from its start event; "" when unknown."""
        return str(self.model.get("device") or "")

    @property
    def on_gpu(self) -> bool:
        """Whether the step memory fields are the GPU allocator's (else the process RSS, on a CPU)."""
        return self.device.startswith(("cuda", "xpu", "mps")) or "gpu_used" in self.nonzero

    def x(self, mode: str = "step") -> np.ndarray:
        """The steps' x positions: optimizer step, tokens seen so far, or seconds since the start."""
        if mode == "tokens":
            return self.tokens_seen.view
        if mode == "time":
            return self.series["elapsed"].view
        return self.steps.view

    def x_at(self, steps: np.ndarray | list[float], mode: str = "step") -> np.ndarray:
        """x positions of events reported at optimizer ``steps`` (evals, markers, system samples)."""
        steps = np.asarray(steps, dtype=np.float64)
        if mode == "step" or not len(self.steps):
            return steps
        return np.interp(steps, self.steps.view, self.x(mode), left=0.0)

    def y(self, name: str) -> np.ndarray:
        return self.series[name].view

    def index_at(self, step: float, clamp: bool = True) -> int | None:
        """Index of the point nearest to ``step``; None when there are no points or, with
        ``clamp=False``, when ``step`` lies beyond the first or last point by more than half a step."""
        xs = self.steps.view
        if not len(xs):
            return None
        if not clamp and (step < xs[0] - 0.5 or step > xs[-1] + 0.5):
            return None
        i = int(np.searchsorted(xs, step))
        if i >= len(xs):
            return len(xs) - 1
        if i > 0 and abs(xs[i - 1] - step) <= abs(xs[i] - step):
            return i - 1
        return i

    def step_at(self, x: float, mode: str = "step") -> float:
        """The optimizer step at position ``x`` of an axis in ``mode`` (for the hover read-out)."""
        if mode == "step" or not len(self.steps):
            return x
        return float(np.interp(x, self.x(mode), self.steps.view))

    def value_at(self, name: str, step: float) -> float | None:
        i = self.index_at(step)
        return None if i is None else float(self.series[name].view[i])

    def best_eval(self) -> tuple[int, float] | None:
        """(step, eval loss) of the lowest eval loss, or None without evals."""
        losses = self.eval_loss.view
        finite = np.isfinite(losses)
        if not finite.any():
            return None
        i = int(np.argmin(np.where(finite, losses, np.inf)))
        return int(self.eval_steps.view[i]), float(losses[i])

    def label(self) -> str:
        """The run's name: its folder's (which may have been renamed since), else its run id."""
        return (Path(self.run_dir).name if self.run_dir else "") or self.run_id or "run"

    # ------------------------------------------------------------------ files

    @classmethod
    def load(cls, path: str | Path) -> RunHistory:
        """Read a run folder (or its metrics.jsonl), tolerantly: a half-written last line (a crash
        mid-write), a broken line or an event type of a newer version is skipped, not an error."""
        p = Path(path)
        metrics = p / "metrics.jsonl" if p.is_dir() else p
        if not metrics.is_file():
            raise FileNotFoundError(f"{metrics} does not exist: not a Tunedeck run folder")
        hist = cls(run_dir=str(metrics.parent), run_id=metrics.parent.name)
        with metrics.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    hist.add(event_from_dict(json.loads(line)))
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue
        # The folder is the truth: it may have been renamed or moved since the run wrote its start event.
        hist.run_dir = str(metrics.parent)
        return hist

    def to_csv(self, path: str | Path) -> int:
        """Write one row per optimizer step (with the eval loss where one was computed); returns the rows."""
        import csv

        cols = [
            ("step", self.steps),
            ("epoch", self.series["epoch"]),
            ("loss", self.series["loss"]),
            ("learning_rate", self.series["lr"]),
            ("grad_norm", self.series["grad_norm"]),
            ("gradient_accumulation_steps", self.series["accum"]),
            ("tokens", self.series["tokens"]),
            ("tokens_seen", self.tokens_seen),
            ("tokens_per_s", self.series["tokens_per_s"]),
            ("step_time_s", self.series["step_time"]),
            ("mem_allocated_mb", self.series["mem_allocated"]),
            ("mem_reserved_mb", self.series["mem_reserved"]),
            ("mem_peak_mb", self.series["mem_peak"]),
            ("elapsed_s", self.series["elapsed"]),
        ]
        evals = dict(zip(self.eval_steps.view.tolist(), self.eval_loss.view.tolist(), strict=False))
        n = len(self.steps)
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow([name for name, _ in cols] + ["eval_loss"])
            arrays = [s.view for _, s in cols]
            for i in range(n):
                row = [_csv_value(a[i]) for a in arrays]
                row.append(_csv_value(evals.get(float(self.steps.view[i]), math.nan)))
                w.writerow(row)
        return n


def _csv_value(v: float) -> str:
    if not math.isfinite(v):
        return ""
    return str(int(v)) if float(v).is_integer() and abs(v) < 2**53 else repr(float(v))


# ---------------------------------------------------------------------- level of detail


class Envelope:
    """Min/max pyramid over a growing Series, so a plot of N points costs O(pixels), not O(N).

    Level k holds the min and max of each complete block of ``BLOCK**(k+1)`` points; :meth:`sync`
    extends the levels with the points appended since the last call (vectorised). :meth:`window`
    returns at most about ``2 * max_blocks`` vertices covering a range of indices: the finest level
    that fits, then finer levels for the incomplete tail, down to raw points. Minimum and maximum of
    every block are both drawn, so no spike is ever hidden (peak downsampling, precomputed).
    """

    BLOCK = 4

    def __init__(self, series: Series) -> None:
        self.src = series
        self.mins: list[Series] = []
        self.maxs: list[Series] = []
        self._gen = series.gen

    def sync(self) -> None:
        n = len(self.src)
        if self.src.gen != self._gen:  # the series was cleared since
            self.mins.clear()
            self.maxs.clear()
            self._gen = self.src.gen
        B = self.BLOCK
        lo_min = lo_max = self.src.view
        size, k = B, 0
        while n // size:
            if k == len(self.mins):
                self.mins.append(Series(max(16, n // size)))
                self.maxs.append(Series(max(16, n // size)))
            done, want = len(self.mins[k]), n // size
            if want > done:
                a, b = done * B, want * B
                with np.errstate(invalid="ignore"):
                    self.mins[k].extend(np.fmin.reduce(lo_min[a:b].reshape(-1, B), axis=1))
                    self.maxs[k].extend(np.fmax.reduce(lo_max[a:b].reshape(-1, B), axis=1))
            lo_min, lo_max = self.mins[k].view, self.maxs[k].view
            size *= B
            k += 1

    def window(self, x: np.ndarray, i0: int, i1: int, max_blocks: int) -> tuple[np.ndarray, np.ndarray]:
        """(xs, ys) for indices [i0, i1) of the source with x positions from ``x`` (same length)."""
        n = min(len(self.src), len(x))
        i0, i1 = max(0, i0), min(n, i1)
        if i1 <= i0:
            return np.empty(0), np.empty(0)
        y = self.src.view
        if i1 - i0 <= max_blocks * 2:
            return x[i0:i1], y[i0:i1]
        xs_parts, ys_parts = [], []
        B = self.BLOCK
        k = -1
        size = 1
        # the coarsest level needed: blocks of `size` points, at most max_blocks of them in range
        while (i1 - i0) / size > max_blocks and k + 1 < len(self.mins):
            k += 1
            size *= B
        start = i0
        while k >= 0 and start < i1:
            mins, maxs = self.mins[k].view, self.maxs[k].view
            b0 = start // size
            b1 = min(-(-i1 // size), len(mins))
            if b1 > b0:
                m = b1 - b0
                centers = np.minimum((np.arange(b0, b1) * size + size // 2), n - 1)
                xb = np.repeat(x[centers], 2)
                yb = np.empty(2 * m)
                yb[0::2] = mins[b0:b1]
                yb[1::2] = maxs[b0:b1]
                xs_parts.append(xb)
                ys_parts.append(yb)
                start = b1 * size
            k -= 1
            size //= B
        if start < i1:
            xs_parts.append(x[start:i1])
            ys_parts.append(y[start:i1])
        return np.concatenate(xs_parts), np.concatenate(ys_parts)


# ---------------------------------------------------------------------- smoothing


def ema(
    values: np.ndarray, weight: float, state: tuple[float, int] = (0.0, 0)
) -> tuple[np.ndarray, tuple[float, int]]:
    """Debiased exponential moving average (as TensorBoard's smoothing), vectorised.

    ``weight`` in [0, 1): 0 is no smoothing. ``state`` = (biased accumulator, count) lets a caller
    extend a smoothed series with new points without redoing the old ones. NaN/inf points are
    skipped (they keep the previous smoothed value). Returns the smoothed values and the new state.
    """
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    acc, count = state
    if n == 0:
        return np.empty(0), state
    if weight <= 0:
        out = values.copy()
        finite = np.isfinite(values)
        k = int(finite.sum())
        last = float(values[finite][-1]) if k else acc
        return out, (last, count + k)
    a = float(weight)
    finite = np.isfinite(values)
    x = np.where(finite, values, 0.0)
    # Skipped points neither decay the accumulator nor count: handle by compressing them out.
    xs = x[finite]
    m = len(xs)
    smoothed_f = np.empty(m)
    if 0 < m <= 64:  # the live case, a few new points: a plain loop beats building the kernel
        for i, v in enumerate(xs.tolist()):
            acc = a * acc + (1 - a) * v
            count += 1
            smoothed_f[i] = acc / (1.0 - a**count)
    elif m:
        block, kernel, powers = _ema_kernel(a)
        pad = (-m) % block
        xb = np.concatenate([xs, np.zeros(pad)]).reshape(-1, block)
        partial = (1 - a) * (xb @ kernel.T)  # contribution of each block's own points
        carry = np.empty(len(xb))
        c = acc
        ab = a**block
        last_partial = partial[:, -1]
        for b in range(len(xb)):
            carry[b] = c
            c = ab * c + last_partial[b]
        biased = partial + carry[:, None] * powers[None, :]
        biased = biased.reshape(-1)[:m]
        t = count + np.arange(1, m + 1)
        with np.errstate(over="ignore", under="ignore"):
            debias = 1.0 - a ** t.astype(np.float64)
        smoothed_f = biased / debias
        acc = float(biased[-1])
        count = count + m
    out = np.empty(n)
    if m == n:
        out[:] = smoothed_f
    else:
        # forward-fill the smoothed value over skipped points (NaN before the first finite one)
        idx = np.cumsum(finite) - 1
        filled = np.where(idx >= 0, smoothed_f[np.clip(idx, 0, max(m - 1, 0))] if m else np.nan, np.nan)
        out[:] = filled
        prev = state[0] / (1.0 - a ** state[1]) if state[1] else np.nan
        out[idx < 0] = prev
    return out, (acc, count)


@functools.lru_cache(maxsize=8)
def _ema_kernel(a: float) -> tuple[int, np.ndarray, np.ndarray]:
    """Block size, lower-triangular kernel L[i, j] = a**(i-j) (j <= i) and a**(k+1), for ema()."""
    block = 256
    while block > 8 and a**block < 1e-300:  # keep a**k representable within a block
        block //= 2
    k = np.arange(block)
    diff = k[:, None] - k[None, :]
    kernel = np.where(diff >= 0, a ** np.clip(diff, 0, None), 0.0)
    return block, kernel, a ** (k + 1)


class Smoother:
    """Keeps an EMA of a growing series up to date, extending it incrementally."""

    def __init__(self, weight: float = 0.6) -> None:
        self.weight = weight
        self.out = Series()
        self._state: tuple[float, int] = (0.0, 0)

    def set_weight(self, weight: float) -> None:
        if weight != self.weight:
            self.weight = weight
            self.reset()

    def reset(self) -> None:
        self.out.clear()
        self._state = (0.0, 0)

    def update(self, values: np.ndarray) -> np.ndarray:
        done = len(self.out)
        if len(values) < done:  # the source was reset
            self.reset()
            done = 0
        if len(values) > done:
            new, self._state = ema(values[done:], self.weight, self._state)
            self.out.extend(new)
        return self.out.view


# ---------------------------------------------------------------------- formatting


def fmt_number(v: Any) -> str:
    """Short, exact-enough text for a hyperparameter or reading: 1e-4, 0.9, 512, cosine."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v == 0:
            return "0"
        if abs(v) < 1e-2 or abs(v) >= 1e6:
            mant, exp = f"{v:.3e}".split("e")
            mant = mant.rstrip("0").rstrip(".")
            return f"{mant}e{int(exp)}"
        return f"{v:.4g}"
    return str(v)


def describe_progress(stage: str, done: int, total: int | None, unit: str) -> str:
    """What a preparation is doing, for the status badge and the log: "loading model…",
    "tokenizing 12,000 / 214,000 rows"."""
    what = "loading model" if stage == "model" else stage or "preparing"
    if total and (total > 1 or unit):  # "model 0 / 1" says no more than "loading model…"
        return f"{what} {done:,} / {total:,}" + (f" {unit}" if unit else "")
    if done:
        return f"{what} {done:,}" + (f" {unit}" if unit else "") + "…"
    return f"{what}…"


def describe_done(stage: str, total: int | None, unit: str) -> str:
    """What a finished preparation did: "model loaded", "tokenizing done: 214,000 rows"."""
    if stage == "model":
        return "model loaded"
    return f"{stage or 'preparing'} done" + (f": {total:,} {unit}" if total and unit else "")


def fmt_mb(mb: float | None) -> str:
    """Memory in MB or GB: 512 MB, 1.5 GB, 23.4 GB."""
    if mb is None or not math.isfinite(mb):
        return "–"
    if abs(mb) >= 1024:
        gb = mb / 1024
        return f"{gb:.2f} GB" if gb < 10 else f"{gb:.1f} GB"
    return f"{mb:,.0f} MB"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "–"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
