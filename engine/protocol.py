"""Commands in and events out: small frozen dataclasses that round-trip through JSON dicts.

The GUI, the CLI, ``--control`` files and the tests all speak this one language with a
``TrainingSession``. Every field holds a plain Python value, never a tensor.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tunedeck.engine.config import LIVE_KEYS
from tunedeck.engine.errors import ConfigError

# ---------------------------------------------------------------- commands


@dataclass(frozen=True)
class Command:
    name: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"cmd": self.name, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Set(Command):
    """Change live hyperparameters from the next optimizer step on."""

    name: ClassVar[str] = "set"
    values: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"cmd": "set", **self.values}


@dataclass(frozen=True)
class Pause(Command):
    name: ClassVar[str] = "pause"


@dataclass(frozen=True)
class Resume(Command):
    name: ClassVar[str] = "resume"


@dataclass(frozen=True)
class Save(Command):
    name: ClassVar[str] = "save"


@dataclass(frozen=True)
class Eval(Command):
    name: ClassVar[str] = "eval"


@dataclass(frozen=True)
class SamplingOptions:
    """How a ``sample`` generates: greedy by default; a temperature above 0 samples."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None

    def check(self) -> SamplingOptions:
        """Refuse out-of-range values with one line each; return self."""
        rules = (
            ("max_new_tokens", 1 <= self.max_new_tokens <= 4096, "a whole number from 1 to 4096"),
            ("temperature", 0.0 <= self.temperature <= 10.0, "from 0 (greedy) to 10"),
            ("top_p", 0.0 < self.top_p <= 1.0, "above 0 and at most 1"),
            ("top_k", self.top_k >= 0, "0 (off) or more"),
            ("seed", self.seed is None or 0 <= self.seed < 2**63, "a whole number >= 0"),
        )
        for name, ok, allowed in rules:
            if not ok:
                raise ConfigError(f"sample {name}={getattr(self, name)!r} is out of range", f"give {allowed}")
        return self


@dataclass(frozen=True)
class Sample(Command):
    """Generate from the model as it is now; the training run is not changed by it."""

    name: ClassVar[str] = "sample"
    prompt: str = ""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def options(self) -> SamplingOptions:
        return SamplingOptions(self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.seed)


@dataclass(frozen=True)
class FindLR(Command):
    """A learning-rate range test on the run as it is now (before the first step, or while paused):
    ``steps`` optimizer steps with the learning rate rising exponentially from ``start_lr`` to
    ``end_lr``, stopped early when the loss diverges; then everything is put back as it was."""

    name: ClassVar[str] = "find_lr"
    start_lr: float = 1e-7
    end_lr: float = 1.0
    steps: int = 100

    def check(self) -> FindLR:
        """Refuse out-of-range values with one line each; return self."""
        rules = (
            ("start_lr", 0.0 < self.start_lr < self.end_lr, "above 0 and below end_lr"),
            ("end_lr", self.end_lr <= 10.0, "at most 10"),
            ("steps", 5 <= self.steps <= 1000, "a whole number from 5 to 1000"),
        )
        for key, ok, allowed in rules:
            if not ok:
                raise ConfigError(f"find_lr {key}={getattr(self, key)!r} is out of range", f"give {allowed}")
        return self


@dataclass(frozen=True)
class Rollback(Command):
    """Go back to a checkpoint of this run in memory and go on from there; the steps after it are kept
    as a branch. ``checkpoint``: a folder name under ``checkpoints/`` (``step-000200``) or ``latest``;
    ``values``: live values to apply at the restored step (JSON: ``"set": {...}``)."""

    name: ClassVar[str] = "rollback"
    checkpoint: str = "latest"
    values: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cmd": "rollback", "checkpoint": self.checkpoint}
        if self.values:
            out["set"] = dict(self.values)
        return out


@dataclass(frozen=True)
class Stop(Command):
    """Finish the current step, save, end."""

    name: ClassVar[str] = "stop"


@dataclass(frozen=True)
class Cancel(Command):
    """End without a final save."""

    name: ClassVar[str] = "cancel"


COMMANDS: dict[str, type[Command]] = {
    c.name: c for c in (Set, Pause, Resume, Save, Eval, Sample, FindLR, Rollback, Stop, Cancel)
}


def command_from_dict(data: dict[str, Any]) -> Command:
    """Parse ``{"cmd": ...}``; a malformed command raises ConfigError with a one-line reason."""
    if not isinstance(data, dict) or "cmd" not in data:
        raise ConfigError(
            f"a command must be an object with a 'cmd' key, got {data!r}",
            f'e.g. {{"cmd": "set", "learning_rate": 2e-4}}; commands: {", ".join(COMMANDS)}',
        )
    name = data["cmd"]
    if not isinstance(name, str) or name not in COMMANDS:
        raise ConfigError(f"unknown command {name!r}", f"commands: {', '.join(COMMANDS)}")
    rest = {k: v for k, v in data.items() if k != "cmd"}
    if name == "set":
        if not rest:
            raise ConfigError("set names no hyperparameter", f"live-changeable: {', '.join(LIVE_KEYS)}")
        return Set(values=rest)
    if name == "rollback":
        return _rollback_from(rest)
    cls = COMMANDS[name]
    allowed = {f.name for f in dataclasses.fields(cls)}
    extra = set(rest) - allowed
    if extra:
        raise ConfigError(
            f"command {name!r} takes no {', '.join(sorted(extra))}",
            f"{name} takes: {', '.join(sorted(allowed)) or 'nothing'}",
        )
    if name == "sample":
        if not isinstance(rest.get("prompt", ""), str):
            raise ConfigError("sample prompt must be text", 'e.g. {"cmd": "sample", "prompt": "Hello"}')
        kinds = {"max_new_tokens": int, "temperature": float, "top_p": float, "top_k": int, "seed": int}
        for key, kind in kinds.items():
            value = rest.get(key)
            ok = value is None if key == "seed" else key not in rest
            ok = ok or (
                not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
            )
            if not ok:
                what = "a number" if kind is float else "a whole number"
                raise ConfigError(f"sample {key}={value!r} is not {what}", f"give {key} {what}")
        command = Sample(**rest)
        command.options().check()
        return command
    if name == "find_lr":
        for key, value in rest.items():
            whole = key == "steps"
            if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
                what = "a whole number" if whole else "a number"
                raise ConfigError(f"find_lr {key}={value!r} is not {what}", f"give {key} {what}")
        return FindLR(**rest).check()
    return cls(**rest)


def _rollback_from(rest: dict[str, Any]) -> Rollback:
    example = '{"cmd": "rollback", "checkpoint": "step-000200", "set": {"learning_rate": 5e-5}}'
    extra = set(rest) - {"checkpoint", "set"}
    if extra:
        raise ConfigError(f"command 'rollback' takes no {', '.join(sorted(extra))}", f"e.g. {example}")
    target = rest.get("checkpoint", "latest")
    if isinstance(target, int) and not isinstance(target, bool):
        target = f"step-{target:06d}"
    if not isinstance(target, str) or not target.strip():
        raise ConfigError(
            f"rollback checkpoint={target!r} is not a checkpoint name",
            f"give a name or latest, e.g. {example}",
        )
    values = rest.get("set", {})
    if not isinstance(values, dict):
        raise ConfigError(f"rollback set={values!r} is not a mapping of live values", f"e.g. {example}")
    return Rollback(checkpoint=target.strip(), values=dict(values))


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class Event:
    type: ClassVar[str] = ""
    time: float = field(default_factory=time.time, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class StartEvent(Event):
    type: ClassVar[str] = "start"
    run_id: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    total_steps: int = 0
    run_dir: str = ""
    resumed_from: str | None = None
    step: int = 0  # the step the run starts from (above 0 when resumed)
    changes: list[dict[str, Any]] = field(default_factory=list)  # change log carried over on resume
    parent: str | None = None  # the run folder this one was resumed from, when it is a new folder

    def fast_paths(self) -> str:
        """One line on how this run computes: attention, optimizer, Liger ("" when the engine said nothing)."""
        m = self.model
        parts = [
            f"{m['attention']} attention" if m.get("attention") else "",
            f"{m['optimizer']} optimizer" if m.get("optimizer") else "",
            ("Liger kernels" + (" with RoPE" if m.get("liger_rope") else "")) if m.get("liger") else "",
        ]
        return ", ".join(p for p in parts if p)

    def compile_note(self) -> str:
        """What to expect when the model is compiled, or ""."""
        compiled = self.model.get("compiled")
        return (
            f"torch.compile ({compiled}): the first steps compile the model and are slow" if compiled else ""
        )


@dataclass(frozen=True)
class StateEvent(Event):
    type: ClassVar[str] = "state"
    state: str = "loading"  # loading | running | paused | stopping | finished


@dataclass(frozen=True)
class StepEvent(Event):
    type: ClassVar[str] = "step"
    step: int = 0
    epoch: float = 0.0
    loss: float = 0.0
    learning_rate: float = 0.0
    grad_norm: float | None = None
    gradient_accumulation_steps: int = 1
    tokens: int = 0
    tokens_per_s: float = 0.0
    step_time_s: float = 0.0
    mem_allocated_mb: float = 0.0
    mem_reserved_mb: float = 0.0
    mem_peak_mb: float = 0.0  # on several processes: the largest of theirs
    mem_peak_mb_ranks: list[float] | None = None  # on several processes: each one's, by rank
    elapsed_s: float = 0.0
    eta_s: float | None = None
    total_steps: int = 0


@dataclass(frozen=True)
class SystemEvent(Event):
    type: ClassVar[str] = "system"
    rss_mb: float = 0.0
    cpu_percent: float = 0.0
    gpu_util: float | None = None
    gpu_mem_used_mb: float | None = None
    gpu_mem_total_mb: float | None = None
    gpu_power_w: float | None = None
    gpu_temp_c: float | None = None


@dataclass(frozen=True)
class EvalEvent(Event):
    type: ClassVar[str] = "eval"
    step: int = 0
    eval_loss: float = 0.0
    perplexity: float = 0.0


@dataclass(frozen=True)
class ChangeEvent(Event):
    type: ClassVar[str] = "change"
    step: int = 0
    changes: dict[str, list[Any]] = field(default_factory=dict)
    source: str = "user"  # user | auto | resume | autopilot
    reason: str = ""  # why an automatic change was made (auto, autopilot)
    rule: str = ""  # the autopilot rule that made it


@dataclass(frozen=True)
class RollbackEvent(Event):
    """The run went back from ``from_step`` to the checkpoint ``checkpoint`` (at ``to_step``); the steps
    in between are kept as branch ``branch`` (``<run>/branches/<branch>/``), None when none were left."""

    type: ClassVar[str] = "rollback"
    from_step: int = 0
    to_step: int = 0
    checkpoint: str = ""
    branch: int | None = None


@dataclass(frozen=True)
class SampleEvent(Event):
    type: ClassVar[str] = "sample"
    step: int = 0
    prompt: str = ""
    text: str = ""


@dataclass(frozen=True)
class ProgressEvent(Event):
    """How far a long preparation has got (loading the model, tokenizing the data), so a terminal can
    draw a bar and the window say what it waits for. ``total`` is None when unknown."""

    type: ClassVar[str] = "progress"
    stage: str = ""  # e.g. "model", "tokenizing"
    done: int = 0
    total: int | None = None
    unit: str = ""  # what done/total count, e.g. "rows"


@dataclass(frozen=True)
class LrFindEvent(Event):
    """A learning-rate range test's curve: the loss of each sweep step at its learning rate, the
    smoothed loss, and the suggestions (``suggestion``: steepest descent of the smoothed loss;
    ``lr_min_div_10``: the learning rate of its minimum, divided by 10). ``stopped`` says why the
    sweep ended: completed, diverged or cancelled."""

    type: ClassVar[str] = "lr_find"
    step: int = 0  # the run's step it was measured at
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    suggestion: float | None = None
    lr_min_div_10: float | None = None
    stopped: str = "completed"
    path: str = ""  # <run>/lr_find.json


@dataclass(frozen=True)
class CheckpointEvent(Event):
    type: ClassVar[str] = "checkpoint"
    step: int = 0
    path: str = ""


@dataclass(frozen=True)
class WarningEvent(Event):
    type: ClassVar[str] = "warning"
    message: str = ""
    kind: str = "internal"
    advice: str = ""


@dataclass(frozen=True)
class ErrorEvent(Event):
    type: ClassVar[str] = "error"
    message: str = ""
    kind: str = "internal"
    advice: str = ""


@dataclass(frozen=True)
class EndEvent(Event):
    type: ClassVar[str] = "end"
    status: str = "completed"  # completed | stopped | cancelled | failed
    step: int = 0
    output: str | None = None


EVENTS: dict[str, type[Event]] = {
    e.type: e
    for e in (
        StartEvent,
        StateEvent,
        StepEvent,
        SystemEvent,
        EvalEvent,
        ChangeEvent,
        RollbackEvent,
        SampleEvent,
        LrFindEvent,
        CheckpointEvent,
        ProgressEvent,
        WarningEvent,
        ErrorEvent,
        EndEvent,
    )
}


def event_from_dict(data: dict[str, Any]) -> Event:
    """Rebuild an event from its JSON dict; fields this version does not know are dropped."""
    cls = EVENTS[data["type"]]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})
