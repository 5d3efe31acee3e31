"""The main window: docks and wiring only. The parts live in gui/widgets/, the engine link in bridge.py.

Layout: run controls on the toolbar; the plots (with an error banner and the "now" strip above
them) in the middle; the setup panel (model, dataset, presets, hyperparameters) docked left; the
log, the run library, the end-of-run summary and the sample panel docked below (tabbed on a small
screen); run status in the status bar. Geometry, dock layout, the last settings, the runs folder and
recent folders are remembered with QSettings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
from pathlib import Path

import psutil
import yaml
from PySide6.QtCore import QEvent, QObject, QRect, QSettings, QStandardPaths, Qt, QTimer
from PySide6.QtGui import QAction, QCloseEvent, QGuiApplication, QKeyEvent, QKeySequence
from PySide6.QtWidgets import (
    QAbstractSpinBox,
    QComboBox,
    QDockWidget,
    QFileDialog,
    QLineEdit,
    QMainWindow,
    QMessageBox,
    QPlainTextEdit,
    QTextEdit,
    QVBoxLayout,
    QWidget,
)

from tunedeck.engine import builtin, checkpoint
from tunedeck.engine import config as cfgmod
from tunedeck.engine.config import Config
from tunedeck.engine.errors import ConfigError
from tunedeck.engine.follow import SILENT_AFTER_S, FollowedRun, LaunchedRun
from tunedeck.engine.protocol import (
    Cancel,
    ChangeEvent,
    Command,
    EndEvent,
    ErrorEvent,
    Eval,
    EvalEvent,
    FindLR,
    LrFindEvent,
    Pause,
    ProgressEvent,
    Resume,
    Rollback,
    Sample,
    SampleEvent,
    SamplingOptions,
    Save,
    Set,
    StartEvent,
    StateEvent,
    StepEvent,
    Stop,
    SystemEvent,
)
from tunedeck.gui import run_library
from tunedeck.gui.bridge import SessionBridge, SessionFactory
from tunedeck.gui.history import RunHistory, describe_progress, fmt_number
from tunedeck.gui.widgets.autopilot import AutopilotPanel
from tunedeck.gui.widgets.banner import Banner
from tunedeck.gui.widgets.controls import RunControls, RunStatus
from tunedeck.gui.widgets.library import RunLibrary
from tunedeck.gui.widgets.log import LogPanel, advice_for
from tunedeck.gui.widgets.lr_finder import LrFinderPanel
from tunedeck.gui.widgets.now import NowStrip
from tunedeck.gui.widgets.plots import PlotPanel
from tunedeck.gui.widgets.samples import SamplePanel
from tunedeck.gui.widgets.setup import SetupPanel
from tunedeck.gui.widgets.summary import NO_RUN, SummaryPanel

APP_NAME = "Tunedeck"
MAX_RECENT = 8
MB = 1024 * 1024
MAX_SIZE = (1920, 1200)  # the window opens as big as the screen allows, up to this
SMALL_SCREEN = (1400, 820)  # below this (available pixels), the docks take less room and are tabbed


# Widgets with key bindings of their own (QLineEdit takes Ctrl+E as "end of line").
TEXT_WIDGETS = (QLineEdit, QPlainTextEdit, QTextEdit, QAbstractSpinBox, QComboBox)


class RunKeys(QObject):
    """Lets the run shortcuts through a text field: its ShortcutOverride for those keys is left
    unaccepted, so the key goes to the window's action rather than the field."""

    def __init__(self, parent: QObject, keys: list[QKeySequence]) -> None:
        super().__init__(parent)
        self.keys = {k.toString() for k in keys if not k.isEmpty()}

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt name)
        if (
            event.type() == QEvent.Type.ShortcutOverride
            and isinstance(event, QKeyEvent)
            and QKeySequence(event.keyCombination()).toString() in self.keys
        ):
            event.ignore()
            return True
        return False


def default_settings() -> QSettings:
    return QSettings("Tunedeck", "tunedeck")


def default_runs_folder() -> str:
    """The user's data folder for runs: $XDG_DATA_HOME/tunedeck/runs (~/.local/share/tunedeck/runs),
    which is QStandardPaths' AppDataLocation for the application "tunedeck"."""
    base = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.GenericDataLocation)
    return str(Path(base or Path.home() / ".local" / "share") / "tunedeck" / "runs")


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
        self.setObjectName("main-window")
        self.bridge = SessionBridge(self, factory=session_factory)
        self.history = RunHistory()
        self.run_config: Config | None = None
        # thread: the engine in this process; launched: tunedeck-train --nproc-per-node N started here
        # and followed; follow: a run folder whose processes live elsewhere (File > Follow run).
        self.run_kind = "thread"
        self.finding_only = False  # the session only measures a learning rate: no run to summarise
        self.launch_factory: SessionFactory = LaunchedRun
        self.follow_silent_after_s = SILENT_AFTER_S
        self.close_when_ended = False
        self.runs_folder = default_runs_folder()

        # -- centre: banner and the "now" strip over the plots
        self.banner = Banner()
        self.now = NowStrip()
        self.plots = PlotPanel()
        centre = QWidget()
        v = QVBoxLayout(centre)
        v.setContentsMargins(4, 4, 4, 0)
        v.setSpacing(2)
        v.addWidget(self.banner)
        v.addWidget(self.now)
        v.addWidget(self.plots, 1)
        self.setCentralWidget(centre)

        # -- docks
        self.setDockOptions(
            QMainWindow.DockOption.AnimatedDocks
            | QMainWindow.DockOption.AllowTabbedDocks
            | QMainWindow.DockOption.AllowNestedDocks
        )
        self.setup = SetupPanel()
        self.log = LogPanel()
        self.samples = SamplePanel()
        self.library = RunLibrary()
        self.summary = SummaryPanel()
        self.autopilot = AutopilotPanel()
        self.lr_finder = LrFinderPanel()
        bottom = Qt.DockWidgetArea.BottomDockWidgetArea
        self.setup_dock = self._dock("Setup", self.setup, Qt.DockWidgetArea.LeftDockWidgetArea)
        self.log_dock = self._dock("Log", self.log, bottom)
        self.library_dock = self._dock("Runs", self.library, bottom)
        self.summary_dock = self._dock("Summary", self.summary, bottom)
        self.samples_dock = self._dock("Samples", self.samples, bottom)
        self.autopilot_dock = self._dock("Autopilot", self.autopilot, bottom)
        self.splitDockWidget(self.log_dock, self.samples_dock, Qt.Orientation.Horizontal)
        self.tabifyDockWidget(self.log_dock, self.library_dock)
        self.tabifyDockWidget(self.library_dock, self.summary_dock)
        self.tabifyDockWidget(self.samples_dock, self.autopilot_dock)
        self.lr_finder_dock = self._dock("LR finder", self.lr_finder, bottom)
        self.tabifyDockWidget(self.samples_dock, self.lr_finder_dock)
        self.log_dock.raise_()
        self.samples_dock.raise_()

        # -- toolbar, status bar, menus
        self.controls = RunControls(self)
        self.addToolBar(Qt.ToolBarArea.TopToolBarArea, self.controls)
        self.status = RunStatus()
        self.statusBar().addPermanentWidget(self.status, 1)
        self._menus()
        # Run shortcuts work wherever the focus is: a text field's own Ctrl+E (end of line) or
        # Ctrl+S must not swallow them.
        self.run_keys = RunKeys(self, [a.shortcut() for a in self.controls.actions()])
        for w in self.findChildren(QWidget):
            if isinstance(w, TEXT_WIDGETS):
                w.installEventFilter(self.run_keys)

        # -- wiring
        c = self.controls
        c.start.connect(self.start_run)
        c.pause.connect(lambda: self.send(Pause()))
        c.resume.connect(lambda: self.send(Resume()))
        c.stop.connect(self.stop_run)
        c.cancel.connect(self.cancel_run)
        c.save.connect(self.save_checkpoint)
        c.evaluate.connect(self.evaluate)
        c.find_lr.connect(self.find_lr)
        self.lr_finder.use.connect(self.use_learning_rate)
        self.setup.validity_changed.connect(lambda ok: c.set_config_ok(ok, self.setup.problem or ""))
        self.setup.form.apply_requested.connect(self.apply_live)
        self.setup.message.connect(self._message)
        self.library.message.connect(self._message)
        self.summary.message.connect(self._message)
        self.samples.message.connect(self._message)
        self.library.overlay_requested.connect(self.overlay_runs)
        self.library.open_requested.connect(self.open_run)
        self.library.follow_requested.connect(self.follow_run)
        self.library.folder_change_requested.connect(self.choose_runs_folder)
        self.samples.generate.connect(self._sample)
        self.plots.rollback.requested.connect(self.send_rollback)
        self.autopilot.command.connect(self.send)
        self.bridge.events.connect(self._on_events)
        self.bridge.ended.connect(self._on_ended)
        # The status bar and the "now" strip follow the steps at 4 Hz: enough to read, and the GUI
        # thread (and the GIL) stays free for training.
        self._pending_step: StepEvent | None = None
        self._status_timer = QTimer(self)
        self._status_timer.setInterval(250)
        self._status_timer.timeout.connect(self._flush_status)
        self._status_timer.start()
        c.set_config_ok(self.setup.problem is None, self.setup.problem or "")

        self._shown_once = False
        self._state_restored = False
        self.fit_to_screen()
        if restore:
            self._restore()
        self.library.set_folder(self.runs_folder)

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
        add(
            f,
            "Open run…",
            self.open_run_dialog,
            "Ctrl+Shift+O",
            "Show a past run's curves from its folder (or list a runs folder)",
        )
        add(
            f,
            "Follow run…",
            self.follow_run_dialog,
            "Ctrl+Shift+F",
            "Watch and steer a live run folder (a run started from a terminal, on one process or many)",
        )
        add(f, "Compare with run…", self.compare_run_dialog, None, "Overlay another run")
        self.clear_compare_action = add(f, "Clear comparison", self.clear_compare)
        self.clear_compare_action.setEnabled(False)
        add(
            f,
            "Resume from checkpoint…",
            self.resume_dialog,
            None,
            "Continue a run from one of its checkpoints/step-N folders",
        )
        add(f, "Runs folder…", self.choose_runs_folder, None, "Where runs started from this window go")
        f.addSeparator()
        add(f, "Export plots as PNG…", lambda: self.export_plots_dialog("png"))
        add(f, "Export plots as SVG…", lambda: self.export_plots_dialog("svg"))
        add(f, "Export metrics as CSV…", self.export_csv_dialog)
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
        for d in (
            self.setup_dock,
            self.log_dock,
            self.library_dock,
            self.summary_dock,
            self.samples_dock,
            self.autopilot_dock,
        ):
            vm.addAction(d.toggleViewAction())
        vm.addSeparator()
        add(vm, "Fit plots", lambda: (self.plots.fit(), self.plots.refresh(force=True)), "Ctrl+0")
        add(vm, "Follow latest step", self.plots.follow, "End")
        pm = vm.addMenu("Plots")
        self.plot_actions: dict[str, QAction] = {}
        for name, title in zip(self.plots.names[1:], self.plots.titles[1:], strict=True):
            a = pm.addAction(title)
            a.setCheckable(True)
            a.setChecked(name not in self.plots.hidden)
            a.toggled.connect(lambda on, n=name: self.set_plot_visible(n, on))
            self.plot_actions[name] = a
        h = mb.addMenu("&Help")
        add(h, "Keyboard shortcuts", self.show_shortcuts, "F1")
        add(h, "About Tunedeck", self.show_about)

    # ------------------------------------------------------------------ size

    def fit_to_screen(self, available: QRect | None = None) -> None:
        """Open within the screen's free area; on a small screen the docks take less room (the
        bottom ones share one tabbed column at the side), so the plots get the space first."""
        if available is None:
            screen = self.screen() or QGuiApplication.primaryScreen()
            available = screen.availableGeometry() if screen is not None else QRect(0, 0, 1500, 920)
        small = available.width() < SMALL_SCREEN[0] or available.height() < SMALL_SCREEN[1]
        self.small_screen = small
        if small:
            # A short screen: the log, samples, runs and summary share one tabbed column on the
            # right, so the plots keep the whole height (a bottom area would leave them ~80 px).
            right = Qt.DockWidgetArea.RightDockWidgetArea
            docks = [
                self.log_dock,
                self.samples_dock,
                self.library_dock,
                self.summary_dock,
                self.autopilot_dock,
                self.lr_finder_dock,
            ]
            for d in docks:
                self.addDockWidget(right, d)
            for d1, d2 in zip(docks, docks[1:], strict=False):
                self.tabifyDockWidget(d1, d2)
            self.log_dock.raise_()
            self.plots.set_compact(True)
            for name, act in self.plot_actions.items():
                act.setChecked(name not in self.plots.hidden)
        # Each dock added to an area first takes a row of its own, and the minimum size Qt derived from
        # those rows holds until the layout is activated again: stale, it keeps the window taller than
        # the screen.
        layout = self.layout()
        if layout is not None:
            layout.activate()
        w = min(MAX_SIZE[0], available.width() - 16)
        h = min(MAX_SIZE[1], available.height() - 16)
        self.resize(max(w, 400), max(h, 300))
        self._size_docks()
        self.move(
            available.x() + (available.width() - self.width()) // 2,
            available.y() + max(0, (available.height() - self.height()) // 2),
        )

    def _size_docks(self) -> None:
        """The docks' share of the window (again once it is shown: before, Qt sizes them its own way)."""
        w = self.width()
        if self.small_screen:
            self.resizeDocks([self.setup_dock, self.log_dock], [300, 330], Qt.Orientation.Horizontal)
        else:
            self.resizeDocks([self.setup_dock], [400], Qt.Orientation.Horizontal)
            self.resizeDocks([self.log_dock], [190], Qt.Orientation.Vertical)
            # the log, runs and summary want the width more than the sample panel
            self.resizeDocks(
                [self.log_dock, self.samples_dock], [int(w * 0.6), int(w * 0.4)], Qt.Orientation.Horizontal
            )

    def showEvent(self, event) -> None:  # noqa: N802 (Qt name)
        super().showEvent(event)
        if not self._shown_once:
            self._shown_once = True
            if not self._state_restored:  # a layout of the user's own stays as it was
                QTimer.singleShot(0, self._size_docks)

    # ------------------------------------------------------------------ keys

    def shortcuts(self) -> list[tuple[str, str]]:
        """(keys, what they do) for every action with a shortcut, menus and run controls alike."""
        out: list[tuple[str, str]] = []
        seen = set()
        for a in [
            *self.controls.actions(),
            *(a for m in self.menuBar().actions() for a in m.menu().actions()),
        ]:
            key = a.shortcut().toString(QKeySequence.SequenceFormat.NativeText)
            if key and (key, a.text()) not in seen:
                seen.add((key, a.text()))
                out.append((key, a.text().replace("&&", "&")))
        return out

    def show_shortcuts(self) -> None:
        rows = "".join(
            f"<tr><td style='padding-right:16px'><b>{html.escape(k)}</b></td><td>{html.escape(t)}</td></tr>"
            for k, t in self.shortcuts()
        )
        QMessageBox.information(
            self,
            "Keyboard shortcuts",
            f"<table>{rows}</table><p>The run keys work wherever the focus is, text fields included. "
            "On the plots: wheel zooms the x axis, drag pans, right-drag zooms to a box, double-click fits.</p>",
        )

    def show_about(self) -> None:
        QMessageBox.about(
            self,
            "About Tunedeck",
            "<b>Tunedeck</b><br>Fine-tune language models (LoRA, QLoRA, full) and steer the run live.<br>"
            f"Runs go to {html.escape(self.runs_folder)}",
        )

    # ------------------------------------------------------------------ settings

    def set_config(self, cfg: Config, origin: str | None = None) -> None:
        self.setup.set_config(cfg)
        if origin:
            self.setup.set_origin(origin, cfg)

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
            self._keep_on_screen()
        state = s.value("window/state")
        if state is not None:
            self._state_restored = bool(self.restoreState(state))
        if s.value("runs/folder"):
            self.runs_folder = str(s.value("runs/folder"))
        hidden = s.value("plots/hidden")
        if hidden is not None:
            hidden = [hidden] if isinstance(hidden, str) else list(hidden)
            for name, a in self.plot_actions.items():
                a.setChecked(name not in hidden)
        text = s.value("last/config")
        restored = False
        if text:
            # an old or broken entry: start as on a first launch
            with contextlib.suppress(ConfigError, yaml.YAMLError, TypeError, AttributeError):
                self.set_config(cfgmod.from_dict(yaml.safe_load(str(text))), "the settings used last time")
                restored = True
        if not restored and builtin.DEMO_PRESET.is_file():
            # The first launch opens on the demo preset, as tunedeck-train runs without a config:
            # Start then shows the tiny model learning within a minute.
            with contextlib.suppress(ConfigError):
                demo = cfgmod.load(builtin.DEMO_PRESET)
                self.set_config(demo, f"preset {builtin.DEMO_PRESET.name}")
                self.setup.preset = (builtin.DEMO_PRESET.name, demo)
        with contextlib.suppress(TypeError, ValueError):
            self.setup.form.set_processes(int(s.value("last/processes") or 1))
        recent = s.value("last/models") or []
        if isinstance(recent, str):
            recent = [recent]
        self.setup.model.set_recent(list(recent))
        if s.value("last/data_dir"):
            self.setup.data.start_dir = str(s.value("last/data_dir"))

    def _keep_on_screen(self, avail: QRect | None = None) -> None:
        """A geometry saved on a bigger screen: fit the window into this one."""
        if avail is None:
            screen = self.screen() or QGuiApplication.primaryScreen()
            if screen is None:
                return
            avail = screen.availableGeometry()
        if self.width() > avail.width() or self.height() > avail.height():
            self.fit_to_screen(avail)

    def save_settings(self) -> None:
        s = self.settings
        s.setValue("window/geometry", self.saveGeometry())
        s.setValue("window/state", self.saveState())
        with contextlib.suppress(ConfigError):  # invalid settings: keep the last good ones
            s.setValue("last/config", cfgmod.dump(self.setup.config()))
        s.setValue("last/data_dir", self.setup.data.start_dir)
        s.setValue("last/processes", self.setup.processes())
        s.setValue("runs/folder", self.runs_folder)
        s.sync()

    def set_runs_folder(self, folder: str | Path) -> None:
        """Where runs started from this window go (kept for next time), and what the library lists."""
        self.runs_folder = str(Path(folder).expanduser().resolve())
        self.settings.setValue("runs/folder", self.runs_folder)
        self.library.set_folder(self.runs_folder)
        self.log.add("info", f"runs go to {self.runs_folder}")

    def choose_runs_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Runs folder", self.runs_folder)
        if path:
            self.set_runs_folder(path)

    def set_plot_visible(self, name: str, on: bool) -> None:
        self.plots.set_plot_visible(name, on)
        self.settings.setValue("plots/hidden", sorted(self.plots.hidden))

    def _remember_model(self, name: str) -> None:
        recent = self.settings.value("last/models") or []
        if isinstance(recent, str):
            recent = [recent]
        recent = [name] + [m for m in recent if m != name]
        self.settings.setValue("last/models", recent[:MAX_RECENT])
        self.setup.model.set_recent(recent[:MAX_RECENT])

    def _message(self, level: str, text: str) -> None:
        self.log.add({"error": "error", "warning": "warning"}.get(level, "info"), text)

    # ------------------------------------------------------------------ run control

    def start_run(self, resume_from: str | Path | None = None, find_lr_only: FindLR | None = None) -> bool:
        """Start a run with the settings (``find_lr_only``: a session that only measures a learning
        rate, the settings locked meanwhile)."""
        if self.bridge.active:
            return False
        try:
            form_cfg = self.setup.config()
        except ConfigError as e:
            self.banner.show_message("The settings need fixing before a run can start", e.one_line())
            self.log.add("error", f"not started: {e.one_line()}")
            return False
        # The range test runs in this window's process: its suggestion holds for a run on several.
        nproc = self.setup.processes() if find_lr_only is None else 1
        problem = self.setup.launch_problem(form_cfg) if nproc > 1 else None
        if problem:
            self.banner.show_message(f"Not started on {nproc} processes", problem)
            self.log.add("error", f"not started: {problem}")
            return False
        self.banner.clear()
        cfg = form_cfg.copy()
        cfg.train.output_dir = run_library.resolve_output_dir(cfg.train.output_dir, self.runs_folder)
        self.run_config = cfg
        self._form_start = form_cfg
        self.run_kind = "launched" if nproc > 1 else "thread"
        self._reset_for_run()
        self.setup.set_running(True, cfg)
        self.controls.set_state("loading")
        self.status.reset(cfg.train.max_steps if cfg.train.max_steps > 0 else 0)
        self.status.set_state("loading")
        self.status.set_detail("starting…")
        self._remember_model(cfg.model.name_or_path)
        self.settings.setValue("last/config", cfgmod.dump(form_cfg))
        self.log.add(
            "info",
            ("finding a learning rate: " if find_lr_only else "starting: ")
            + f"{cfg.model.name_or_path} on {cfg.data.path}"
            + (f", resuming from {resume_from}" if resume_from else "")
            + f"; runs go to {cfg.train.output_dir}",
        )
        self.finding_only = find_lr_only is not None
        if find_lr_only is not None:
            self.setup.setEnabled(False)  # nothing trains, so nothing can be applied
        self.setWindowTitle(f"{APP_NAME} — loading…")
        factory = None
        if nproc > 1:

            def factory(config, resume_from=None):
                run = self.launch_factory(config, resume_from, nproc=nproc)
                self.log.add(
                    "info",
                    f"launched on {nproc} processes: tunedeck-train --nproc-per-node {nproc}, writing "
                    f"{run.run_dir} (its output: {run.log_path})",
                )
                self.status.set_where(
                    f"{nproc} processes",
                    f"tunedeck-train --nproc-per-node {nproc}, started by this window as a process of "
                    f"its own, followed through {run.run_dir}; its output: {run.log_path}",
                )
                return run

        ok = self.bridge.start(cfg, resume_from=resume_from, factory=factory, find_lr_only=find_lr_only)
        if ok:
            self.library.busy_path = None
        return ok

    def find_lr(self) -> None:
        """Before a run: a session that only measures; while paused: the range test on the run as it is."""
        try:
            options = self.lr_finder.options()
        except ConfigError as e:
            self.banner.show_message("The learning-rate sweep needs fixing", e.one_line())
            return
        self.lr_finder_dock.raise_()
        if not self.bridge.active:
            self.start_run(find_lr_only=options)
        elif self.bridge.state == "paused":
            self.log.add("info", "finding a learning rate; the run is put back as it was afterwards")
            self.send(options)

    def use_learning_rate(self, lr: float) -> None:
        """A suggestion taken: applied to the paused run, or set for the next run."""
        editor = self.setup.form.editor("train.learning_rate")
        editor.set_value(lr)
        if self.bridge.active and self.bridge.state in ("running", "paused"):
            self.apply_live({"learning_rate": lr})
        else:
            self.log.add("info", f"learning rate set to {fmt_number(lr)} for the next run")

    def _reset_for_run(self) -> None:
        """A new run (own or followed) takes the plots, the strip, the summary and the sample panel."""
        self.history = RunHistory()
        self.plots.set_history(self.history)
        self.now.clear()
        self.summary.clear()
        self.samples.release_model()  # the last run's model goes: two never share the memory
        self.samples.set_live(False)
        self.status.set_where("")
        self.close_when_ended = False

    # ------------------------------------------------------------------ following

    def follow_run(self, path: str | Path) -> bool:
        """Watch and steer a live run folder whose processes live elsewhere (started from a terminal, on
        one process or many): its metrics.jsonl feeds the plots, commands go to its control.jsonl."""
        if self.bridge.active:
            self.banner.show_message(
                "A run is going in this window", "stop it, or wait for its end, before following another"
            )
            return False
        try:
            run = FollowedRun(path, silent_after_s=self.follow_silent_after_s)
        except ConfigError as e:
            self.banner.show_message("Not a run folder to follow", e.one_line())
            self.log.add("error", f"not followed: {e.one_line()}")
            return False
        self.banner.clear()
        self.run_kind = "follow"
        self._form_start = None
        self._reset_for_run()
        self.setup.set_running(True)  # locked now; the run's settings come with its start event
        self.controls.set_state("loading")
        self.status.reset(0)
        self.status.set_state("loading")
        self.status.set_detail("reading its folder…")
        self.status.set_where(
            "following",
            f"The run's processes live elsewhere; this window reads {Path(path) / 'metrics.jsonl'} and "
            f"sends commands to {Path(path) / 'control.jsonl'}",
        )
        self.log.add(
            "info",
            f"following {path}: its processes run elsewhere; commands go to its control.jsonl",
        )
        self.setWindowTitle(f"{APP_NAME} — following {Path(path).name}")
        return self.bridge.start(None, factory=lambda config, resume_from=None: run)

    def follow_run_dialog(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Follow a live run (its folder)", self._runs_dir())
        if path:
            self.follow_run(path)

    def _followed_start(self, ev: StartEvent) -> None:
        """A followed run's settings fill the form, so Apply changes what it runs with."""
        if not ev.config:
            return
        try:
            cfg = cfgmod.from_dict(ev.config)
        except ConfigError as e:
            self.log.add("warning", f"its settings could not be shown: {e.one_line()}")
            return
        self.setup.set_config(cfg)
        n = int(ev.model.get("world_size") or 1)
        self.setup.form.set_processes(n)
        if n > 1:
            self.status.set_where(f"following · {n} processes", self.status.where_label.toolTip())
        self.setup.set_origin(f"run {ev.run_id} (followed)", cfg)
        self.setup.set_running(True, cfg)
        self._form_start = cfg

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

    def evaluate(self) -> None:
        if self.bridge.active:
            self.log.add("info", "evaluating at the next step boundary…")
            self.status.set_detail("evaluating…")
            self.send(Eval())

    def save_checkpoint(self) -> None:
        if self.bridge.active:
            self.log.add("info", "saving a checkpoint at the next step boundary…")
            self.send(Save())

    def send_rollback(self, cmd: Rollback) -> None:
        with_values = ", then " + ", ".join(f"{k}={fmt_number(v)}" for k, v in cmd.values.items())
        self.log.add("change", f"rolling back to {cmd.checkpoint}" + (with_values if cmd.values else ""))
        self.send(cmd)

    def apply_live(self, changes: dict) -> None:
        if not changes:
            return
        self.log.add("change", "applying " + ", ".join(f"{k}={fmt_number(v)}" for k, v in changes.items()))
        self.send(Set(values=dict(changes)))

    def _sample(self, prompt: str, options: SamplingOptions) -> None:
        self.send(Sample(prompt=prompt, **dataclasses.asdict(options)))

    # ------------------------------------------------------------------ events

    def _on_events(self, batch: list) -> None:
        last_step: StepEvent | None = None
        progress: ProgressEvent | None = None
        for ev in batch:
            self.history.add(ev)
            self.log.add_event(ev)
            self.autopilot.add_event(ev)
            match ev:
                case StepEvent():
                    last_step = ev
                case SystemEvent():
                    self._read_host_memory()
                case ProgressEvent():
                    progress = ev
                case StartEvent(run_id=run_id, run_dir=run_dir, total_steps=total):
                    self.status.set_total(total)
                    self.library.busy_path = run_dir or None
                    self.setWindowTitle(f"{APP_NAME} — {run_id}")
                    if self.run_kind == "follow":
                        self._followed_start(ev)
                case StateEvent(state=state):
                    self.controls.set_state(state)
                    self.status.set_state(state)
                    self.setup.form.set_paused(state == "paused")
                    live = state in ("running", "paused")
                    self.samples.set_live(live)
                    self.plots.rollback.live = live
                    self.rollback_action.setEnabled(live)
                    self.autopilot.set_live(live)
                    if self.history.run_id:
                        how = {"follow": "following, ", "launched": "processes, "}.get(self.run_kind, "")
                        if self.run_kind == "launched":
                            how = f"{self.setup.processes()} {how}"
                        self.setWindowTitle(f"{APP_NAME} — {self.history.run_id} ({how}{state})")
                case EvalEvent():
                    if self.status.detail_label.text() == "evaluating…":
                        self.status.set_detail("")
                case ChangeEvent(changes=changes):
                    self.setup.form.note_changes(changes)
                    if "total_steps" in changes:
                        self.status.set_total(int(changes["total_steps"][1]))
                case SampleEvent():
                    self.samples.add_sample(ev)
                case LrFindEvent():
                    self.lr_finder.show_result(ev)
                    self.lr_finder_dock.raise_()
                case ErrorEvent(message=message, kind=kind, advice=advice):
                    self.banner.show_message(message, advice_for(kind, advice))
                    self.samples.command_refused()
                case _:
                    pass
        if progress is not None and progress.stage == "find_lr":
            self.status.step_label.setText(
                f"finding a learning rate: {progress.done} / {progress.total} steps"
            )
        elif progress is not None and self.bridge.state == "loading":
            self.status.set_detail(
                describe_progress(progress.stage, progress.done, progress.total, progress.unit)
            )
        if last_step is not None:
            self._pending_step = last_step
            self.plots.poke()

    def _read_host_memory(self) -> None:
        # The machine's memory next to the engine's reading (a CPU run's truth is RSS and what is left).
        with contextlib.suppress(Exception):
            vm = psutil.virtual_memory()
            self.history.set_host_memory((vm.total - vm.available) / MB, vm.total / MB)

    def _flush_status(self) -> None:
        if self._pending_step is not None:
            self.status.update_step(self._pending_step)
            self._pending_step = None
            # the smoother extends itself incrementally: the strip's value is the newest step's
            sm = self.plots.smoother.update(self.history.series["loss"].view)
            self.now.update_from(
                self.history, float(sm[-1]) if len(sm) else None, self.status.state == "running"
            )

    def _on_ended(self, end: EndEvent) -> None:
        finding, self.finding_only = self.finding_only, False
        self._flush_status()
        self.controls.set_state("idle")
        self.setup.setEnabled(True)
        self.setup.set_running(False)
        self.samples.set_live(False)
        self.plots.rollback.live = False
        self.rollback_action.setEnabled(False)
        self.autopilot.set_live(False)
        self.status.set_state("failed" if end.status == "failed" else end.status)
        self.now.update_from(self.history, None, False)
        self.library.busy_path = None
        if end.status == "failed" and not self.banner.isVisible():
            self.banner.show_message(f"The run failed at step {end.step}", "see the log for what happened")
        title = self.history.label() if self.history.run_dir else "run"
        self.setWindowTitle(f"{APP_NAME} — {title} ({end.status})")
        self.plots.refresh(force=True)
        start = getattr(self, "_form_start", None)
        if finding:
            # A range test trained nothing: its result is the LR finder's curve, not a run's summary,
            # and the model is as it found it, so there is nothing new to chat with.
            self.summary.clear(NO_RUN)
            self.status.step_label.setText(
                "learning-rate range test done" if end.status == "completed" else f"range test {end.status}"
            )
            self.lr_finder_dock.raise_()
        else:
            if start is not None:
                kept = {}
                for ch in self.history.changes:
                    for k, (old, new) in ch.changes.items():
                        if k in cfgmod.LIVE_KEYS:
                            kept[k] = [kept.get(k, [old])[0], new]
                kept = {k: v for k, v in kept.items() if v[0] != v[1]}
                self.setup.note_run_ended(title, start, kept)
            if self.history.run_dir:
                self._show_summary(self.history)
                self.summary_dock.raise_()
            self._keep_model(title, end.status)
        self.library.refresh()
        if self.close_when_ended:
            self.close()

    def _keep_model(self, run: str, status: str) -> None:
        """After the run, the trained model stays in memory for the sample panel (until the next run)."""
        session = self.bridge.session
        if status == "failed" or session is None or not hasattr(session, "sampler"):
            return
        try:
            sampler = session.sampler()
        except Exception:  # no model to keep is no reason to trouble the end of a run
            sampler = None
        if sampler is not None:
            self.samples.keep_model(sampler, f"run {run}, as trained (kept in memory until the next run)")
            self.log.add("muted", "the trained model stays loaded: chat with it in the Samples panel")

    def _show_summary(self, hist: RunHistory) -> None:
        self.summary.show_summary(
            run_library.summarize(hist, run_library.read_config(hist.run_dir)), hist.config or None
        )

    # ------------------------------------------------------------------ past runs

    def _runs_dir(self) -> str:
        return self.runs_folder

    def open_run(self, path: str | Path) -> RunHistory | None:
        """Show a past run's curves, summary and settings; during a run it is overlaid instead.
        A runs folder (one that holds run folders) becomes the library's folder."""
        if run_library.is_runs_folder(path):
            self.set_runs_folder(path)
            self.library_dock.show()
            self.library_dock.raise_()
            return None
        if self.bridge.active:
            return self.compare_run(path)
        try:
            hist = RunHistory.load(path)
        except OSError as e:
            self.banner.show_message(
                f"Could not open the run: {e}",
                "choose a run folder (it holds metrics.jsonl) or a runs folder (it holds run folders)",
            )
            return None
        self.history = hist
        self.plots.set_history(hist)
        self.banner.clear()
        last = hist.last_step
        self.status.reset(hist.total_steps)
        self.status.set_where("")
        if last is not None:
            self.status.update_step(last)
        self.status.set_state(hist.status or "unfinished")
        sm = self.plots.smoother.out
        self.now.update_from(hist, sm.last() if len(sm) else None, False)
        self.setWindowTitle(f"{APP_NAME} — {hist.label()} (past run)")
        self.log.add(
            "info",
            f"opened run {hist.label()}: {len(hist):,} steps, {len(hist.changes)} live changes, "
            f"status {hist.status or 'unfinished'}",
        )
        self._show_summary(hist)
        config = hist.config or run_library.read_config(hist.run_dir)
        if config:
            try:
                cfg = cfgmod.from_dict(config)
                self.set_config(cfg, f"run {hist.label()}'s starting settings")
                self.setup.run_start = (f"run {hist.label()}", cfg)
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
        self.plots.set_overlays([*(o.hist for o in self.plots.overlays), hist])
        self.clear_compare_action.setEnabled(True)
        self.log.add("info", f"comparing with run {hist.label()}")
        return hist

    def overlay_runs(self, paths: list[str]) -> None:
        """Overlay these runs (the library's selection) on the plots; the run shown is left out."""
        hists = []
        for p in paths:
            if self.history.run_dir and Path(p) == Path(self.history.run_dir):
                continue
            with contextlib.suppress(OSError):
                hists.append(RunHistory.load(p))
        self.plots.set_overlays(hists)
        self.clear_compare_action.setEnabled(bool(hists))

    def clear_compare(self) -> None:
        self.library.table.clearSelection()
        self.plots.set_overlays([])
        self.clear_compare_action.setEnabled(False)

    def open_run_dialog(self) -> None:
        path = QFileDialog.getExistingDirectory(
            self, "Open a run folder (or a runs folder)", self._runs_dir()
        )
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
            self.set_config(checkpoint.read_config(Path(path)), f"checkpoint {Path(path).name}'s settings")
        except ConfigError as e:
            self.banner.show_message("Not a checkpoint to resume from", e.one_line())
            return
        self.start_run(resume_from=path)

    # ------------------------------------------------------------------ export

    def export_plots(self, path: str) -> None:
        (self.plots.export_svg if path.lower().endswith(".svg") else self.plots.export_png)(path)
        self.log.add("info", f"plots saved to {path}")

    def export_csv(self, path: str) -> int:
        n = self.history.to_csv(path)
        self.log.add("info", f"{n:,} steps of metrics saved to {path}")
        return n

    def export_plots_dialog(self, kind: str) -> None:
        name = f"{self.history.label()}.{kind}"
        path, _ = QFileDialog.getSaveFileName(
            self,
            f"Export plots as {kind.upper()}",
            str(Path(self._runs_dir()) / name),
            f"{kind.upper()} (*.{kind})",
        )
        if path:
            try:
                self.export_plots(path)
            except OSError as e:
                self.log.add("error", f"plots not saved: {e}")

    def export_csv_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self,
            "Export metrics as CSV",
            str(Path(self._runs_dir()) / f"{self.history.label()}.csv"),
            "CSV (*.csv)",
        )
        if path:
            try:
                self.export_csv(path)
            except OSError as e:
                self.log.add("error", f"metrics not saved: {e}")

    # ------------------------------------------------------------------ closing

    def ask_close(self) -> str:
        """'stop' (stop and save), 'cancel' (end without the final save) or 'stay'."""
        return self._choose(
            "A run is going",
            "A run is still going. What should happen to it?",
            "Stop and save finishes the current step and saves the adapter; Cancel ends "
            "without the final save (checkpoints and metrics already written stay). "
            "The window closes once the run has ended.",
            [("stop", "Stop and save", QMessageBox.ButtonRole.AcceptRole),
             ("cancel", "Cancel run", QMessageBox.ButtonRole.DestructiveRole)],
            default="stop",
        )  # fmt: skip

    def _choose(
        self,
        title: str,
        text: str,
        info: str,
        choices: list[tuple[str, str, QMessageBox.ButtonRole]],
        default: str,
    ) -> str:
        """A question with ``choices`` (key, label, role) and Stay (Escape); the key chosen, or 'stay'."""
        box = QMessageBox(self)
        box.setIcon(QMessageBox.Icon.Question)
        box.setWindowTitle(title)
        box.setText(text)
        box.setInformativeText(info)
        buttons = {key: box.addButton(label, role) for key, label, role in choices}
        stay = box.addButton("Stay", QMessageBox.ButtonRole.RejectRole)
        box.setDefaultButton(buttons[default])
        box.setEscapeButton(stay)
        box.exec()
        clicked = box.clickedButton()
        return next((key for key, b in buttons.items() if b is clicked), "stay")

    def changeEvent(self, event: QEvent) -> None:  # noqa: N802 (Qt name)
        # Coming back to the window (say, after creating the missing dataset file in a terminal):
        # check the paths again, so a stale "does not exist" does not keep Start off.
        if event.type() == QEvent.Type.ActivationChange and self.isActiveWindow():
            self.setup.revalidate()
        super().changeEvent(event)

    def ask_close_followed(self) -> str:
        """'stop' (send the followed run stop: it saves and ends), 'leave' (it goes on without the
        window) or 'stay'."""
        return self._choose(
            "Following a run",
            "This window is following a run that goes on in its own processes. Stop it?",
            "Stop the run finishes its current step and saves the adapter (the window closes once it "
            "has ended); Leave it going closes the window and the run goes on (follow it again with "
            "File › Follow run).",
            [("stop", "Stop the run", QMessageBox.ButtonRole.AcceptRole),
             ("leave", "Leave it going", QMessageBox.ButtonRole.DestructiveRole)],
            default="leave",
        )  # fmt: skip

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 (Qt name)
        if self.bridge.active and self.run_kind == "follow":
            choice = self.ask_close_followed()
            if choice == "stay":
                self.close_when_ended = False
                event.ignore()
                return
            if choice == "leave":
                self.log.add("info", "left the followed run going")
                self.bridge.release()
                self.save_settings()
                event.accept()
                return
            self.close_when_ended = True
            self.stop_run()
            self.banner.show_message(
                "Stopping the run…", "the window closes when it has saved and ended", level="warning"
            )
            event.ignore()
            return
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
