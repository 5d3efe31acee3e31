"""The main window: docks and wiring only. The parts live in gui/widgets/, the engine link in bridge.py.

Layout: run controls on the toolbar; the plots (with an error banner above them) in the middle;
the setup panel (model, dataset, presets, hyperparameters) docked left; the log and the sample
panel docked below; run status in the status bar. Geometry, dock layout, the last settings and
recent folders are remembered with QSettings.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import yaml
from PySide6.QtCore import QEvent, QSettings, Qt, QTimer
from PySide6.QtGui import QAction, QCloseEvent, QKeySequence
from PySide6.QtWidgets import QDockWidget, QFileDialog, QMainWindow, QMessageBox, QVBoxLayout, QWidget

from tunedeck.engine import builtin, checkpoint
from tunedeck.engine import config as cfgmod
from tunedeck.engine.config import Config
from tunedeck.engine.errors import ConfigError
from tunedeck.engine.protocol import (
    Cancel,
    ChangeEvent,
    Command,
    EndEvent,
    ErrorEvent,
    Eval,
    Pause,
    Resume,
    Rollback,
    Sample,
    SampleEvent,
    Save,
    Set,
    StartEvent,
    StateEvent,
    StepEvent,
    Stop,
    SystemEvent,
)
from tunedeck.gui.bridge import SessionBridge, SessionFactory
from tunedeck.gui.history import RunHistory, fmt_number
from tunedeck.gui.widgets.autopilot import AutopilotPanel
from tunedeck.gui.widgets.banner import Banner
from tunedeck.gui.widgets.controls import RunControls, RunStatus
from tunedeck.gui.widgets.log import LogPanel, advice_for
from tunedeck.gui.widgets.plots import PlotPanel
from tunedeck.gui.widgets.samples import SamplePanel
from tunedeck.gui.widgets.setup import SetupPanel

APP_NAME = "Tunedeck"
MAX_RECENT = 8


def default_settings() -> QSettings:
    return QSettings("Tunedeck", "tunedeck")


class MainWindow(QMainWindow):
    def __init__(
        self,
        settings: QSettings | None = None,
        session_factory: SessionFactory | None = None,
        restore: bool = True,
    ) -> None:
        super().__init__()
        self.settings = settings if settings is not None else default_settings()
        self.setWindowTitle(APP_NAME)
        self.resize(1500, 920)
        self.bridge = SessionBridge(self, factory=session_factory)
        self.history = RunHistory()
        self.run_config: Config | None = None
        self.close_when_ended = False
        self._run_dir: str | None = None  # where runs were last seen, for the open dialogs

        # -- centre: banner over the plots
        self.banner = Banner()
        self.plots = PlotPanel()
        centre = QWidget()
        v = QVBoxLayout(centre)
        v.setContentsMargins(4, 4, 4, 0)
        v.setSpacing(4)
        v.addWidget(self.banner)
        v.addWidget(self.plots, 1)
        self.setCentralWidget(centre)

        # -- docks
        self.setup = SetupPanel()
        self.log = LogPanel()
        self.samples = SamplePanel()
        self.autopilot = AutopilotPanel()
        self.setup_dock = self._dock("Setup", self.setup, Qt.DockWidgetArea.LeftDockWidgetArea)
        self.log_dock = self._dock("Log", self.log, Qt.DockWidgetArea.BottomDockWidgetArea)
        self.samples_dock = self._dock("Samples", self.samples, Qt.DockWidgetArea.BottomDockWidgetArea)
        self.splitDockWidget(self.log_dock, self.samples_dock, Qt.Orientation.Horizontal)
        self.autopilot_dock = self._dock("Autopilot", self.autopilot, Qt.DockWidgetArea.BottomDockWidgetArea)
        self.tabifyDockWidget(self.samples_dock, self.autopilot_dock)
        self.samples_dock.raise_()
        self.resizeDocks([self.setup_dock], [430], Qt.Orientation.Horizontal)
        self.resizeDocks([self.log_dock], [210], Qt.Orientation.Vertical)

        # -- toolbar, status bar, menus
        self.controls = RunControls(self)
        self.addToolBar(Qt.ToolBarArea.TopToolBarArea, self.controls)
        self.status = RunStatus()
        self.statusBar().addPermanentWidget(self.status, 1)
        self._menus()

        # -- wiring
        c = self.controls
        c.start.connect(self.start_run)
        c.pause.connect(lambda: self.send(Pause()))
        c.resume.connect(lambda: self.send(Resume()))
        c.stop.connect(self.stop_run)
        c.cancel.connect(self.cancel_run)
        c.save.connect(lambda: self.send(Save()))
        c.evaluate.connect(lambda: self.send(Eval()))
        self.setup.validity_changed.connect(lambda ok: c.set_config_ok(ok, self.setup.problem or ""))
        self.setup.form.apply_requested.connect(self.apply_live)
        self.setup.message.connect(
            lambda level, text: self.log.add("error" if level == "error" else "info", text)
        )
        self.samples.generate.connect(lambda prompt, n: self.send(Sample(prompt=prompt, max_new_tokens=n)))
        self.plots.rollback.requested.connect(self.send_rollback)
        self.autopilot.command.connect(self.send)
        self.bridge.events.connect(self._on_events)
        self.bridge.ended.connect(self._on_ended)
        # The status bar follows the steps at 4 Hz: enough to read, and the GUI thread (and the GIL)
        # stays free for training.
        self._pending_step: StepEvent | None = None
        self._status_timer = QTimer(self)
        self._status_timer.setInterval(250)
        self._status_timer.timeout.connect(self._flush_status)
        self._status_timer.start()
        c.set_config_ok(self.setup.problem is None, self.setup.problem or "")

        if restore:
            self._restore()

    def _dock(self, title: str, widget: QWidget, area: Qt.DockWidgetArea) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(f"dock-{title.lower()}")
        dock.setWidget(widget)
        dock.setFeatures(
            QDockWidget.DockWidgetFeature.DockWidgetMovable
            | QDockWidget.DockWidgetFeature.DockWidgetFloatable
            | QDockWidget.DockWidgetFeature.DockWidgetClosable
        )
        self.addDockWidget(area, dock)
        return dock

    def _menus(self) -> None:
        mb = self.menuBar()
        f = mb.addMenu("&File")

        def add(menu, text, slot, shortcut=None, tip=None) -> QAction:
            a = menu.addAction(text)
            a.triggered.connect(slot)
            if shortcut:
                a.setShortcut(QKeySequence(shortcut))
            if tip:
                a.setStatusTip(tip)
            return a

        add(f, "Load settings…", self.setup.load_preset_dialog, "Ctrl+O", "Load a preset or config YAML")
        add(
            f, "Save settings as…", self.setup.save_preset_dialog, "Ctrl+Shift+S", "Save the settings as YAML"
        )
        f.addSeparator()
        add(f, "Open run…", self.open_run_dialog, "Ctrl+Shift+O", "Show a past run's curves from its folder")
        add(f, "Compare with run…", self.compare_run_dialog, None, "Overlay a second run, dashed")
        self.clear_compare_action = add(f, "Clear comparison", self.clear_compare)
        self.clear_compare_action.setEnabled(False)
        add(
            f,
            "Resume from checkpoint…",
            self.resume_dialog,
            None,
            "Continue a run from one of its checkpoints/step-N folders",
        )
        f.addSeparator()
        add(f, "Quit", self.close, "Ctrl+Q")
        r = mb.addMenu("&Run")
        for a in self.controls.actions():
            r.addAction(a)
        r.addSeparator()
        self.rollback_action = add(
            r,
            "Roll back to a checkpoint…",
            lambda: self.plots.rollback.ask(),
            None,
            "Go back to a checkpoint of this run, optionally with a new learning rate (or click a "
            "checkpoint mark on the loss plot)",
        )
        self.rollback_action.setEnabled(False)
        vm = mb.addMenu("&View")
        for d in (self.setup_dock, self.log_dock, self.samples_dock, self.autopilot_dock):
            vm.addAction(d.toggleViewAction())
        add(vm, "Fit plots", lambda: (self.plots.fit(), self.plots.refresh(force=True)), "Ctrl+0")

    # ------------------------------------------------------------------ settings

    def set_config(self, cfg: Config) -> None:
        self.setup.set_config(cfg)

    def load_config(self, path: str | Path) -> bool:
        ok = self.setup.load_preset(path)
        if not ok:
            self.banner.show_message(
                f"could not load {path}", self.log.entries[-1][2] if self.log.entries else ""
            )
        return ok

    def _restore(self) -> None:
        s = self.settings
        geo = s.value("window/geometry")
        if geo is not None:
            self.restoreGeometry(geo)
        state = s.value("window/state")
        if state is not None:
            self.restoreState(state)
        text = s.value("last/config")
        restored = False
        if text:
            # an old or broken entry: start as on a first launch
            with contextlib.suppress(ConfigError, yaml.YAMLError, TypeError, AttributeError):
                self.set_config(cfgmod.from_dict(yaml.safe_load(str(text))))
                restored = True
        if not restored and builtin.DEMO_PRESET.is_file():
            # The first launch opens on the demo preset, as tunedeck-train runs without a config:
            # Start then shows the tiny model learning within a minute.
            with contextlib.suppress(ConfigError):
                self.set_config(cfgmod.load(builtin.DEMO_PRESET))
        recent = s.value("last/models") or []
        if isinstance(recent, str):
            recent = [recent]
        self.setup.model.set_recent(list(recent))
        if s.value("last/run_dir"):
            self._run_dir = str(s.value("last/run_dir"))
        if s.value("last/data_dir"):
            self.setup.data.start_dir = str(s.value("last/data_dir"))

    def save_settings(self) -> None:
        s = self.settings
        s.setValue("window/geometry", self.saveGeometry())
        s.setValue("window/state", self.saveState())
        with contextlib.suppress(ConfigError):  # invalid settings: keep the last good ones
            s.setValue("last/config", cfgmod.dump(self.setup.config()))
        s.setValue("last/data_dir", self.setup.data.start_dir)
        if self._run_dir:
            s.setValue("last/run_dir", self._run_dir)
        s.sync()

    def _remember_model(self, name: str) -> None:
        recent = self.settings.value("last/models") or []
        if isinstance(recent, str):
            recent = [recent]
        recent = [name] + [m for m in recent if m != name]
        self.settings.setValue("last/models", recent[:MAX_RECENT])
        self.setup.model.set_recent(recent[:MAX_RECENT])

    # ------------------------------------------------------------------ run control

    def start_run(self, resume_from: str | Path | None = None) -> bool:
        if self.bridge.active:
            return False
        try:
            cfg = self.setup.config()
        except ConfigError as e:
            self.banner.show_message("The settings need fixing before a run can start", e.one_line())
            self.log.add("error", f"not started: {e.one_line()}")
            return False
        self.banner.clear()
        self.run_config = cfg
        self.history = RunHistory()
        self.plots.set_history(self.history)
        self.setup.set_running(True, cfg)
        self.controls.set_state("loading")
        self.status.reset(cfg.train.max_steps if cfg.train.max_steps > 0 else 0)
        self.status.set_state("loading")
        self.samples.set_live(False)
        self.close_when_ended = False
        self._remember_model(cfg.model.name_or_path)
        self.settings.setValue("last/config", cfgmod.dump(cfg))
        self.log.add(
            "info",
            f"starting: {cfg.model.name_or_path} on {cfg.data.path}"
            + (f", resuming from {resume_from}" if resume_from else ""),
        )
        self.setWindowTitle(f"{APP_NAME} — loading…")
        return self.bridge.start(cfg, resume_from=resume_from)

    def send(self, cmd: Command) -> None:
        if self.bridge.active:
            self.bridge.send(cmd)

    def stop_run(self) -> None:
        if self.bridge.active:
            self.log.add("info", "stop requested: finishing the current step, then saving")
            self.send(Stop())

    def cancel_run(self) -> None:
        if self.bridge.active:
            self.log.add("warning", "cancel requested: ending without a final save")
            self.send(Cancel())

    def send_rollback(self, cmd: Rollback) -> None:
        with_values = ", then " + ", ".join(f"{k}={fmt_number(v)}" for k, v in cmd.values.items())
        self.log.add("change", f"rolling back to {cmd.checkpoint}" + (with_values if cmd.values else ""))
        self.send(cmd)

    def apply_live(self, changes: dict) -> None:
        if not changes:
            return
        self.log.add("change", "applying " + ", ".join(f"{k}={fmt_number(v)}" for k, v in changes.items()))
        self.send(Set(values=dict(changes)))

    # ------------------------------------------------------------------ events

    def _on_events(self, batch: list) -> None:
        last_step: StepEvent | None = None
        for ev in batch:
            self.history.add(ev)
            if isinstance(ev, StepEvent):
                last_step = ev
                continue
            if isinstance(ev, SystemEvent):
                continue
            self.log.add_event(ev)
            self.autopilot.add_event(ev)
            if isinstance(ev, StartEvent):
                self.status.set_total(ev.total_steps)
                if ev.run_dir:
                    self._run_dir = str(Path(ev.run_dir).parent)
                self.setWindowTitle(f"{APP_NAME} — {ev.run_id}")
            elif isinstance(ev, StateEvent):
                self.controls.set_state(ev.state)
                self.status.set_state(ev.state)
                self.samples.set_live(ev.state in ("running", "paused"))
                self.plots.rollback.live = ev.state in ("running", "paused")
                self.rollback_action.setEnabled(self.plots.rollback.live)
                self.autopilot.set_live(self.plots.rollback.live)
                if self.history.run_id:
                    self.setWindowTitle(f"{APP_NAME} — {self.history.run_id} ({ev.state})")
            elif isinstance(ev, ChangeEvent):
                self.setup.form.note_changes(ev.changes)
                if "total_steps" in ev.changes:
                    self.status.set_total(int(ev.changes["total_steps"][1]))
            elif isinstance(ev, SampleEvent):
                self.samples.add_sample(ev)
            elif isinstance(ev, ErrorEvent):
                self.banner.show_message(ev.message, advice_for(ev.kind, ev.advice))
                self.samples.command_refused()
        if last_step is not None:
            self._pending_step = last_step

    def _flush_status(self) -> None:
        if self._pending_step is not None:
            self.status.update_step(self._pending_step)
            self._pending_step = None

    def _on_ended(self, end: EndEvent) -> None:
        self._flush_status()
        self.controls.set_state("idle")
        self.setup.set_running(False)
        self.samples.set_live(False)
        self.plots.rollback.live = False
        self.rollback_action.setEnabled(False)
        self.autopilot.set_live(False)
        self.status.set_state("failed" if end.status == "failed" else end.status)
        if end.status == "failed" and not self.banner.isVisible():
            self.banner.show_message(f"The run failed at step {end.step}", "see the log for what happened")
        title = self.history.run_id or "run"
        self.setWindowTitle(f"{APP_NAME} — {title} ({end.status})")
        self.plots.refresh(force=True)
        if self.close_when_ended:
            self.close()

    # ------------------------------------------------------------------ past runs

    def _runs_dir(self) -> str:
        if self._run_dir:
            return self._run_dir
        try:
            return str(Path(self.setup.config().train.output_dir).resolve())
        except ConfigError:
            return str(Path.cwd())

    def open_run(self, path: str | Path) -> RunHistory | None:
        """Show a past run's curves (and its settings in the form). During a run it is overlaid instead."""
        if self.bridge.active:
            return self.compare_run(path)
        try:
            hist = RunHistory.load(path)
        except OSError as e:
            self.banner.show_message(
                f"Could not open the run: {e}", "choose a run folder (it holds metrics.jsonl)"
            )
            return None
        self.history = hist
        self.plots.set_history(hist)
        self.banner.clear()
        self._run_dir = str(Path(hist.run_dir).parent)
        last = hist.last_step
        self.status.reset(hist.total_steps)
        if last is not None:
            self.status.update_step(last)
        self.status.set_state(hist.status or "unfinished")
        self.setWindowTitle(f"{APP_NAME} — {hist.label()} (past run)")
        self.log.add(
            "info",
            f"opened run {hist.label()}: {len(hist):,} steps, {len(hist.changes)} live changes, "
            f"status {hist.status or 'unfinished'}",
        )
        if hist.config:
            try:
                self.set_config(cfgmod.from_dict(hist.config))
                self.log.add("muted", "its settings are now in the Setup panel")
            except ConfigError as e:
                self.log.add("warning", f"its settings could not be loaded: {e.one_line()}")
        return hist

    def compare_run(self, path: str | Path) -> RunHistory | None:
        try:
            hist = RunHistory.load(path)
        except OSError as e:
            self.banner.show_message(
                f"Could not open the run: {e}", "choose a run folder (it holds metrics.jsonl)"
            )
            return None
        self.plots.set_overlay(hist)
        self.clear_compare_action.setEnabled(True)
        self.log.add("info", f"comparing with run {hist.label()} (dashed, grey)")
        return hist

    def clear_compare(self) -> None:
        self.plots.set_overlay(None)
        self.clear_compare_action.setEnabled(False)

    def open_run_dialog(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open a run folder", self._runs_dir())
        if path:
            self.open_run(path)

    def compare_run_dialog(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Run to compare with", self._runs_dir())
        if path:
            self.compare_run(path)

    def resume_dialog(self) -> None:
        if self.bridge.active:
            return
        path = QFileDialog.getExistingDirectory(
            self, "Checkpoint to resume from (checkpoints/step-N)", self._runs_dir()
        )
        if not path:
            return
        try:  # the checkpoint's settings: a resume cannot change what they fix (see engine/resume.py)
            self.set_config(checkpoint.read_config(Path(path)))
        except ConfigError as e:
            self.banner.show_message("Not a checkpoint to resume from", e.one_line())
            return
        self.start_run(resume_from=path)

    # ------------------------------------------------------------------ closing

    def ask_close(self) -> str:
        """'stop' (stop and save), 'cancel' (end without the final save) or 'stay'."""
        box = QMessageBox(self)
        box.setIcon(QMessageBox.Icon.Question)
        box.setWindowTitle("A run is going")
        box.setText("A run is still going. What should happen to it?")
        box.setInformativeText(
            "Stop and save finishes the current step and saves the adapter; Cancel ends "
            "without the final save (checkpoints and metrics already written stay). "
            "The window closes once the run has ended."
        )
        stop = box.addButton("Stop and save", QMessageBox.ButtonRole.AcceptRole)
        cancel = box.addButton("Cancel run", QMessageBox.ButtonRole.DestructiveRole)
        stay = box.addButton("Stay", QMessageBox.ButtonRole.RejectRole)
        box.setDefaultButton(stop)
        box.setEscapeButton(stay)
        box.exec()
        clicked = box.clickedButton()
        return "stop" if clicked is stop else "cancel" if clicked is cancel else "stay"

    def changeEvent(self, event: QEvent) -> None:  # noqa: N802 (Qt name)
        # Coming back to the window (say, after creating the missing dataset file in a terminal):
        # check the paths again, so a stale "does not exist" does not keep Start off.
        if event.type() == QEvent.Type.ActivationChange and self.isActiveWindow():
            self.setup.revalidate()
        super().changeEvent(event)

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 (Qt name)
        if self.bridge.active:
            choice = self.ask_close()
            if choice == "stay":
                self.close_when_ended = False
                event.ignore()
                return
            self.close_when_ended = True
            if choice == "stop":
                self.stop_run()
                self.banner.show_message(
                    "Stopping and saving…", "the window closes when the adapter is saved", level="warning"
                )
            else:
                self.cancel_run()
                self.banner.show_message(
                    "Cancelling…", "the window closes when the run has ended", level="warning"
                )
            event.ignore()
            return
        self.save_settings()
        event.accept()
