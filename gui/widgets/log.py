"""The log panel: what the run did (start, state changes, evals, live changes, checkpoints, end),
and every warning and error with advice on what to do about it."""

from __future__ import annotations

import html
import time

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QCheckBox, QHBoxLayout, QPlainTextEdit, QPushButton, QVBoxLayout, QWidget

from tunedeck.engine.protocol import (
    ChangeEvent,
    CheckpointEvent,
    EndEvent,
    ErrorEvent,
    EvalEvent,
    Event,
    LrFindEvent,
    ProgressEvent,
    RollbackEvent,
    SampleEvent,
    StartEvent,
    StateEvent,
    WarningEvent,
)
from tunedeck.gui.history import Change, describe_done, describe_progress, fmt_number

LEVEL_COLORS = {
    "info": "#aeb4bd",
    "change": "#ffd166",
    "warning": "#f5c16c",
    "error": "#ff7a85",
    "success": "#4fd1a5",
    "muted": "#7d838c",
}

# Said when the engine gave no advice of its own.
DEFAULT_ADVICE = {
    "oom": "out of memory: lower the batch size (raise gradient accumulation to keep the effective batch), "
    "lower max length, turn on gradient checkpointing, or use 4-bit quantization",
    "nan": "the loss became NaN/inf: lower the learning rate (halve it), keep max grad norm at 1.0, "
    "check the data for empty or broken examples, or use bfloat16 rather than float16",
    "data": "check data.path and the dataset's columns (see the preview)",
    "model": "check model.name_or_path: a hub id your machine can download, a local folder, or builtin:tiny",
    "config": "fix the setting named in the message",
}
MAX_ENTRIES = 5000


def advice_for(kind: str, advice: str) -> str:
    return advice or DEFAULT_ADVICE.get(kind, "")


class LogPanel(QWidget):
    entry_added = Signal(str, str)  # (level, text)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.view = QPlainTextEdit()
        self.view.setReadOnly(True)
        self.view.setMaximumBlockCount(MAX_ENTRIES)
        self.view.setStyleSheet("font-family: monospace; font-size: 12px;")
        self.problems_only = QCheckBox("warnings and errors only")
        self.clear_button = QPushButton("Clear")
        top = QHBoxLayout()
        top.setContentsMargins(4, 2, 4, 2)
        top.addWidget(self.problems_only)
        top.addStretch(1)
        top.addWidget(self.clear_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(0)
        lay.addLayout(top)
        lay.addWidget(self.view)
        self.entries: list[tuple[float, str, str, str]] = []  # (time, level, text, advice)
        self._progress_stage = ""  # the preparation stage last logged
        self.problems_only.toggled.connect(self._rerender)
        self.clear_button.clicked.connect(self.clear)

    # ------------------------------------------------------------------ entries

    def add(self, level: str, text: str, advice: str = "", when: float | None = None) -> None:
        entry = (when or time.time(), level, text, advice)
        self.entries.append(entry)
        if len(self.entries) > MAX_ENTRIES:
            del self.entries[: len(self.entries) - MAX_ENTRIES]
        if self._shown(level):
            self.view.appendHtml(self._html(*entry))
        self.entry_added.emit(level, text)

    def add_event(self, ev: Event) -> None:
        t = ev.time
        match ev:
            case StartEvent():
                self._start(ev)
            case StateEvent(state=state):
                self.add("muted", f"state: {state}", when=t)
            case ProgressEvent(stage=stage, done=done, total=total, unit=unit):
                # One line when a stage begins and one when it is done, not one per update.
                first = stage != self._progress_stage
                self._progress_stage = stage
                if first:
                    self.add("info", describe_progress(stage, done, total, unit), when=t)
                elif total and done >= total:
                    self.add("muted", describe_done(stage, total, unit), when=t)
            case EvalEvent(step=step, eval_loss=loss, perplexity=ppl):
                self.add(
                    "info",
                    f"step {step}: eval loss {fmt_number(loss)} (perplexity {fmt_number(ppl)})",
                    when=t,
                )
            case ChangeEvent(step=step, changes=changes, source=source, rule=rule, reason=reason):
                who = {"user": "you", "resume": "the resume", "autopilot": f"the autopilot ({rule})"}.get(
                    source, "the engine"
                )
                why = f": {reason}" if reason else ""
                self.add(
                    "change",
                    f"after step {step}, {who} changed {Change(step, changes, source).label()}{why}",
                    when=t,
                )
            case RollbackEvent(from_step=from_step, to_step=to_step, checkpoint=ckpt, branch=branch):
                kept = f"; steps {to_step + 1}-{from_step} kept as branch {branch}" if branch else ""
                self.add("change", f"rolled back from step {from_step} to {ckpt}{kept}", when=t)
            case LrFindEvent(step=step, lrs=lrs, stopped=stopped, suggestion=suggestion):
                found = (
                    f"suggested learning rate {fmt_number(suggestion)} (steepest descent), minimum/10 "
                    f"{fmt_number(ev.lr_min_div_10)}"
                    if suggestion is not None
                    else "no suggestion (the loss did not fall)"
                )
                self.add(
                    "info",
                    f"step {step}: learning-rate range test over {len(lrs)} steps ({stopped}): {found}",
                    when=t,
                )
            case CheckpointEvent(step=step, path=path):
                self.add("info", f"step {step}: checkpoint saved to {path}", when=t)
            case SampleEvent(step=step, text=text):
                self.add("muted", f"step {step}: sample generated ({len(text)} characters)", when=t)
            case WarningEvent(kind=kind, message=message, advice=advice):
                self.add("warning", f"warning ({kind}): {message}", advice_for(kind, advice), when=t)
            case ErrorEvent(kind=kind, message=message, advice=advice):
                self.add("error", f"error ({kind}): {message}", advice_for(kind, advice), when=t)
            case EndEvent(status=status, step=step, output=output):
                level = {"completed": "success", "stopped": "success", "cancelled": "warning"}.get(
                    status, "error"
                )
                # a run's output is its final/ adapter; a range test's, its lr_find.json
                what = "adapter in" if output and output.endswith("final") else "wrote"
                out = f", {what} {output}" if output else ""
                self.add(level, f"run {status} at step {step}{out}", when=t)
            case _:
                pass  # steps and system readings are the plots' business

    def _start(self, ev: StartEvent) -> None:
        t = ev.time
        m = ev.model or {}
        d = ev.data or {}
        params = m.get("params_trainable"), m.get("params_total")
        p = f", {params[0]:,} of {params[1]:,} parameters trainable" if all(params) else ""
        where = f" on {m.get('device')}" if m.get("device") else ""
        self._progress_stage = ""
        self.add(
            "info",
            f"run {ev.run_id} started{where}: {ev.total_steps:,} steps, "
            f"{d.get('train_examples', '?')} train / {d.get('eval_examples', '?')} eval examples{p}",
            when=t,
        )
        if ev.resumed_from:
            self.add("info", f"resumed from {ev.resumed_from} at step {ev.step}", when=t)
        if ev.fast_paths():
            self.add("muted", ev.fast_paths(), when=t)
        if ev.compile_note():
            self.add("info", ev.compile_note(), when=t)
        self.add("muted", f"run folder {ev.run_dir}", when=t)

    def text(self) -> str:
        return "\n".join(f"{lvl}: {txt}" + (f" -> {adv}" if adv else "") for _, lvl, txt, adv in self.entries)

    def clear(self) -> None:
        self.entries.clear()
        self.view.clear()

    # ------------------------------------------------------------------ rendering

    def _shown(self, level: str) -> bool:
        return not self.problems_only.isChecked() or level in ("warning", "error")

    def _html(self, when: float, level: str, text: str, advice: str) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(when))
        color = LEVEL_COLORS.get(level, LEVEL_COLORS["info"])
        out = (
            f"<span style='color:#6b7078'>{stamp}</span>&nbsp; "
            f"<span style='color:{color}'>{html.escape(text)}</span>"
        )
        if advice:
            out += f"<br><span style='color:#8fd3ff'>&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;→ {html.escape(advice)}</span>"
        return out

    def _rerender(self) -> None:
        self.view.clear()
        for e in self.entries:
            if self._shown(e[1]):
                self.view.appendHtml(self._html(*e))
