"""Run controls (a toolbar of actions) and the run status shown in the status bar."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QLabel, QProgressBar, QStyle, QToolBar, QWidget

from tunedeck.engine.protocol import StepEvent
from tunedeck.gui.history import fmt_duration

STATE_COLORS = {
    "idle": "#6b7280",
    "loading": "#d9a32b",
    "running": "#2f9e6e",
    "paused": "#4f7fd9",
    "stopping": "#d9a32b",
    "finished": "#6b7280",
    "failed": "#c2414b",
}


class RunControls(QToolBar):
    """Start, Pause/Resume, Stop & Save, Cancel, Save checkpoint now, Evaluate now, Find LR."""

    start = Signal()
    pause = Signal()
    resume = Signal()
    stop = Signal()
    cancel = Signal()
    save = Signal()
    evaluate = Signal()
    find_lr = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Run", parent)
        self.setObjectName("run-controls")
        self.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.setMovable(False)
        sp = self.style().standardIcon
        P = QStyle.StandardPixmap

        def act(text, icon, tip, shortcut, slot) -> QAction:
            a = QAction(sp(icon), text, self)
            a.setToolTip(f"{tip} ({shortcut})")
            a.setShortcut(QKeySequence(shortcut))
            a.triggered.connect(slot)
            self.addAction(a)
            return a

        self.start_action = act(
            "Start", P.SP_MediaPlay, "Start training with these settings", "F5", self.start.emit
        )
        self.pause_action = act(
            "Pause", P.SP_MediaPause, "Pause after the current optimizer step", "F6", self._pause_clicked
        )
        self.stop_action = act(
            "Stop && Save",
            P.SP_MediaStop,
            "Finish the current step, save the adapter to final/ and end",
            "F8",
            self.stop.emit,
        )
        self.cancel_action = act(
            "Cancel",
            P.SP_DialogCancelButton,
            "End now without a final save (checkpoints already written stay)",
            "Shift+F8",
            self.cancel.emit,
        )
        self.addSeparator()
        self.save_action = act(
            "Save checkpoint", P.SP_DialogSaveButton, "Write a checkpoint now", "Ctrl+S", self.save.emit
        )
        self.eval_action = act(
            "Evaluate", P.SP_FileDialogContentsView, "Compute the eval loss now", "Ctrl+E", self.evaluate.emit
        )
        self.find_lr_action = act(
            "Find LR",
            P.SP_FileDialogDetailedView,
            "Measure a learning rate: a short sweep of rising learning rates on the model as it is, "
            "then everything put back as it was (before a run, or while paused)",
            "Ctrl+L",
            self.find_lr.emit,
        )
        self.state = "idle"
        self.config_ok = True
        self.config_problem = ""
        self.set_state("idle")

    def _pause_clicked(self) -> None:
        (self.resume if self.state == "paused" else self.pause).emit()

    def set_config_ok(self, ok: bool, problem: str = "") -> None:
        self.config_ok, self.config_problem = ok, problem
        self.set_state(self.state)

    def set_state(self, state: str) -> None:
        """idle | loading | running | paused | stopping (finished counts as idle)."""
        self.state = "idle" if state == "finished" else state
        s = self.state
        live = s in ("running", "paused")
        self.start_action.setEnabled(s == "idle" and self.config_ok)
        self.start_action.setToolTip(
            "Start training with these settings (F5)"
            if self.config_ok or s != "idle"
            else f"Fix the settings first: {self.config_problem}"
        )
        self.pause_action.setEnabled(live)
        paused = s == "paused"
        self.pause_action.setText("Resume" if paused else "Pause")
        self.pause_action.setIcon(
            self.style().standardIcon(
                QStyle.StandardPixmap.SP_MediaPlay if paused else QStyle.StandardPixmap.SP_MediaPause
            )
        )
        self.pause_action.setToolTip(
            "Carry on training (F6)" if paused else "Pause after the current optimizer step (F6)"
        )
        self.stop_action.setEnabled(s in ("loading", "running", "paused"))
        self.cancel_action.setEnabled(s in ("loading", "running", "paused", "stopping"))
        self.save_action.setEnabled(live)
        self.eval_action.setEnabled(live)
        self.find_lr_action.setEnabled((s == "idle" and self.config_ok) or paused)


class RunStatus(QWidget):
    """State pill, step / total, progress bar, elapsed, ETA and tokens/s, for the status bar."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from PySide6.QtWidgets import QHBoxLayout

        lay = QHBoxLayout(self)
        lay.setContentsMargins(4, 0, 4, 0)
        lay.setSpacing(14)
        self.state_label = QLabel()
        self.where_label = QLabel()  # where the run's processes are, when not this window's own thread
        self.where_label.setStyleSheet("color: #7fb3ff;")
        self.where_label.setVisible(False)
        self.detail_label = QLabel()  # what a loading run waits for: "tokenizing 12,000 / 214,000 rows"
        self.detail_label.setStyleSheet("color: #d9a32b;")
        self.step_label = QLabel()
        self.progress = QProgressBar()
        self.progress.setMinimumWidth(80)
        self.progress.setMaximumWidth(220)
        self.progress.setTextVisible(True)
        self.progress.setMaximumHeight(16)
        self.elapsed_label = QLabel()
        self.eta_label = QLabel()
        self.tps_label = QLabel()
        for w in (
            self.state_label,
            self.where_label,
            self.detail_label,
            self.step_label,
            self.progress,
            self.elapsed_label,
            self.eta_label,
            self.tps_label,
        ):
            lay.addWidget(w)
        lay.addStretch(1)
        self.state_label.setToolTip("What the run is doing")
        self.step_label.setToolTip("Optimizer steps done / planned")
        self.eta_label.setToolTip("Estimated time left, from the recent step times")
        self.tps_label.setToolTip("Training tokens processed per second")
        self.state = "idle"
        self.step = 0
        self.total = 0
        self.reset()

    def reset(self, total: int = 0) -> None:
        self.step, self.total = 0, total
        self.step_label.setText(f"step 0 / {total or '–'}")
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(0)
        self.elapsed_label.setText("elapsed –")
        self.eta_label.setText("ETA –")
        self.tps_label.setText("– tok/s")
        self.set_state("idle")

    def set_total(self, total: int) -> None:
        self.total = total
        self.progress.setRange(0, max(total, 1))
        self.step_label.setText(f"step {self.step} / {total or '–'}")

    def set_state(self, state: str) -> None:
        self.state = state
        color = STATE_COLORS.get(state, "#6b7280")
        self.state_label.setText(
            f"<span style='background:{color}; color:white; padding:1px 8px; "
            f"border-radius:3px'>&nbsp;{state}&nbsp;</span>"
        )
        if state != "loading":
            self.set_detail("")
        if state != "running":
            # Nothing moves while paused or after the end: an ETA or a rate from before would be stale.
            self.eta_label.setText("ETA –" if state != "paused" else "ETA (paused)")
            self.tps_label.setText("– tok/s")

    def set_where(self, text: str, tip: str = "") -> None:
        """Where the run goes: "2 processes", "following" (nothing for the window's own thread)."""
        self.where_label.setText(text)
        self.where_label.setToolTip(tip)
        self.where_label.setVisible(bool(text))

    def set_detail(self, text: str) -> None:
        self.detail_label.setText(text)
        self.detail_label.setVisible(bool(text))

    def update_step(self, ev: StepEvent) -> None:
        self.step = ev.step
        if ev.total_steps and ev.total_steps != self.total:
            self.set_total(ev.total_steps)
        self.step_label.setText(f"step {ev.step:,} / {self.total:,}" if self.total else f"step {ev.step:,}")
        self.progress.setValue(min(ev.step, max(self.total, 1)))
        self.elapsed_label.setText(f"elapsed {fmt_duration(ev.elapsed_s)}")
        if self.state == "running":
            self.eta_label.setText(f"ETA {fmt_duration(ev.eta_s)}")
            self.tps_label.setText(f"{ev.tokens_per_s:,.0f} tok/s")
