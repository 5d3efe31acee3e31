"""Run setup: model, dataset, presets and the hyperparameter form, as one scrollable panel.

:meth:`SetupPanel.config` builds the engine's ``Config`` from all of them through
``tunedeck.engine.config.from_dict``, so the rules between settings (4-bit needs LoRA, ...) are the engine's
own; :attr:`problem` holds the first thing to fix, in the engine's words, and is shown in red
above the form. A local dataset file or model folder that does not exist is one too (the pickers'
``check``), so Start is refused up front rather than failing the run. Presets are plain config
YAML files (``tunedeck.engine.config.load`` / ``save``).
"""

from __future__ import annotations

import html
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QApplication,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QMenu,
    QPushButton,
    QScrollArea,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from tunedeck.engine import builtin
from tunedeck.engine import config as cfgmod
from tunedeck.engine.config import Config
from tunedeck.engine.errors import ConfigError
from tunedeck.gui.history import fmt_number
from tunedeck.gui.widgets.data_picker import DataPicker
from tunedeck.gui.widgets.hyperparams import HyperparamForm
from tunedeck.gui.widgets.model_picker import ModelPicker

PRESETS_DIR = builtin.RESOURCES / "presets"


class SetupPanel(QWidget):
    validity_changed = Signal(bool)  # on every new verdict: True when valid, False with a (new) problem
    preset_loaded = Signal(str)  # path
    message = Signal(str, str)  # (level: info | error, text) for the log

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = ModelPicker()
        self.data = DataPicker()
        self.form = HyperparamForm()
        self.problem: str | None = None
        self.preset_dir = str(PRESETS_DIR if PRESETS_DIR.is_dir() else Path.home())

        # presets row
        self.load_button = QPushButton("Load…")
        self.load_button.setToolTip("Load settings from a preset or config YAML file.")
        self.save_button = QPushButton("Save…")
        self.save_button.setToolTip("Save the current settings as a preset (config YAML).")
        self.presets_button = QToolButton()
        self.presets_button.setText("Presets")
        self.presets_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.presets_menu = QMenu(self.presets_button)
        self.presets_menu.aboutToShow.connect(self._fill_presets_menu)
        self.presets_button.setMenu(self.presets_menu)
        prow = QHBoxLayout()
        prow.addWidget(self.presets_button)
        prow.addWidget(self.load_button)
        prow.addWidget(self.save_button)
        prow.addStretch(1)

        self.problem_label = QLabel()
        self.problem_label.setWordWrap(True)
        self.problem_label.setStyleSheet(
            "color: #ffd7da; background: #5c1f24; border-radius: 3px; padding: 4px 6px;"
        )
        self.problem_label.setVisible(False)

        model_box = QGroupBox("Model")
        QVBoxLayout(model_box).addWidget(self.model)
        data_box = QGroupBox("Dataset")
        QVBoxLayout(data_box).addWidget(self.data)

        inner = QWidget()
        lay = QVBoxLayout(inner)
        lay.setContentsMargins(6, 6, 6, 6)
        lay.addLayout(prow)
        lay.addWidget(self.problem_label)
        lay.addWidget(model_box)
        lay.addWidget(data_box)
        lay.addWidget(self.form)
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setWidget(inner)
        # where the values come from, and the way back to them
        self.origin_label = QLabel()
        self.origin_label.setWordWrap(True)
        self.origin_label.setStyleSheet("color: #8a9099;")
        self.reset_button = QToolButton()
        self.reset_button.setText("Reset to…")
        self.reset_button.setToolTip("Put back the settings of the preset or of a run's start.")
        self.reset_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.reset_menu = QMenu(self.reset_button)
        self.reset_menu.aboutToShow.connect(self._fill_reset_menu)
        self.reset_button.setMenu(self.reset_menu)
        orow = QHBoxLayout()
        orow.setContentsMargins(6, 4, 6, 0)
        orow.addWidget(self.origin_label, 1)
        orow.addWidget(self.reset_button, 0, Qt.AlignmentFlag.AlignTop)
        bar = self.form.apply_bar
        bar.layout().setContentsMargins(6, 4, 6, 6)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.setSpacing(0)
        outer.addLayout(orow)
        outer.addWidget(self.scroll, 1)
        outer.addWidget(bar)  # pinned below the scroll area: always in view during a run
        self.origin: tuple[str, Config] | None = None  # (what the values came from, those settings)
        self._origin_note = ""
        self.preset: tuple[str, Config] | None = None  # the preset or file loaded last
        self.run_start: tuple[str, Config] | None = None  # a run's starting settings

        self.load_button.clicked.connect(self.load_preset_dialog)
        self.save_button.clicked.connect(self.save_preset_dialog)
        self.model.changed.connect(self.revalidate)
        self.data.changed.connect(self.revalidate)
        self.form.edited.connect(self.revalidate)
        self.revalidate()

    # ------------------------------------------------------------------ config

    def raw(self) -> dict:
        data = self.form.values()
        data["model"]["name_or_path"] = self.model.value()
        data["data"]["path"] = self.data.value()
        return data

    def config(self) -> Config:
        """The validated Config; raises ConfigError (the first problem) if something is wrong."""
        errs = self.form.errors()
        for err in (self.model.check(), self.data.check(), *errs.values()):
            if err:
                raise ConfigError(err)
        return cfgmod.from_dict(self.raw())

    def set_config(self, cfg: Config) -> None:
        self.model.set_value(cfg.model.name_or_path)
        self.data.set_value(cfg.data.path)
        self.form.set_config(cfg)
        self.revalidate()

    def processes(self) -> int:
        """How many processes a run started now goes on (1: in the window's own thread)."""
        return self.form.processes.value()

    def launch_problem(self, cfg: Config) -> str | None:
        """What ``tunedeck-train --nproc-per-node N`` would refuse ``cfg`` with on the processes asked
        for (the engine's own check, e.g. fsdp cannot shard a 4-bit model), or None."""
        n = self.processes()
        if n <= 1:
            return None
        from tunedeck.engine.follow import check_launch

        try:
            check_launch(cfg, n)
        except ConfigError as e:
            return e.one_line()
        return None

    def revalidate(self, *_args) -> bool:
        launch = None
        try:
            launch = self.launch_problem(self.config())
            problem = launch
        except ConfigError as e:
            problem = e.one_line()
        self.form.show_processes_error(launch)
        changed = problem != self.problem
        self.problem = problem
        n = len(self.form.errors()) + bool(self.model.check()) + bool(self.data.check())
        if problem:
            head = f"{n} settings need fixing: " if n > 1 else ""
            self.problem_label.setText(head + problem)
        self.problem_label.setVisible(bool(problem))
        self._show_origin()
        if changed:
            self.validity_changed.emit(problem is None)
        return problem is None

    # ------------------------------------------------------------------ where the values come from

    def set_origin(self, what: str, cfg: Config, note: str = "") -> None:
        """The form now holds ``cfg``, which came from ``what`` ("preset demo.yaml", ...); ``note``
        adds a word on it (say, the live changes a finished run kept)."""
        self.origin = (what, cfg)
        self._origin_note = note
        self._show_origin()

    def edited_since_origin(self) -> list[str]:
        """Settings (section.key) whose value differs from where the form's values came from."""
        if self.origin is None:
            return []
        try:
            now = self.config().to_dict()
        except ConfigError:
            now = self.raw()
        then = self.origin[1].to_dict()
        return [
            f"{section}.{key}"
            for section, values in then.items()
            for key, v in values.items()
            if now.get(section, {}).get(key, v) != v
        ]

    def note_run_ended(self, run: str, start: Config, kept: dict[str, list]) -> None:
        """A run has ended: the form holds the values it ended with (live changes included)."""
        self.run_start = (f"run {run}", start)
        try:
            ended = self.config()
        except ConfigError:
            ended = start
        if kept:
            changed = ", ".join(f"{k} {fmt_number(v[0])}→{fmt_number(v[1])}" for k, v in kept.items())
            note = f"changed live: {changed}. The next Start uses these values."
        else:
            note = ""
        self.set_origin(f"as run {run} ended", ended, note)

    def _show_origin(self) -> None:
        if self.origin is None:
            self.origin_label.setText("")
            return
        what, _ = self.origin
        text = f"Settings: <b>{html.escape(what)}</b>"
        note = self._origin_note
        if note:
            text += f"; <span style='color:#d9a32b'>{html.escape(note)}</span>"
        edited = self.edited_since_origin()
        if edited:
            names = ", ".join(edited[:2]) + (f" +{len(edited) - 2}" if len(edited) > 2 else "")
            text += f"; edited: {html.escape(names)}"
        self.origin_label.setText(text)
        self.origin_label.setToolTip("Differs from there: " + ", ".join(edited) if edited else "")

    def reset_choices(self) -> list[tuple[str, Config]]:
        """What Reset to… offers: the preset loaded last, a run's starting settings."""
        out = []
        if self.preset is not None:
            out.append((f"Preset {self.preset[0]}", self.preset[1]))
        if self.run_start is not None:
            out.append((f"Starting settings of {self.run_start[0]}", self.run_start[1]))
        return out

    def reset_to(self, label: str) -> bool:
        for text, cfg in self.reset_choices():
            if text == label:
                self.set_config(cfg)
                self.set_origin(text[0].lower() + text[1:], cfg)
                self.message.emit("info", f"settings reset to the {text[0].lower() + text[1:]}")
                return True
        return False

    def _fill_reset_menu(self) -> None:
        self.reset_menu.clear()
        choices = self.reset_choices()
        for text, _ in choices:
            act = self.reset_menu.addAction(text)
            act.triggered.connect(lambda _=False, t=text: self.reset_to(t))
        if not choices:
            self.reset_menu.addAction("(no preset or run to go back to)").setEnabled(False)

    def set_running(self, running: bool, cfg: Config | None = None) -> None:
        # Locking the field that has the focus would make Qt hand the focus to the next enabled one
        # and scroll the panel to it (Apply out of view): the view stays where the user left it.
        top = self.scroll.verticalScrollBar().value()
        focus = QApplication.focusWidget()
        if running and focus is not None and self.isAncestorOf(focus):
            live = {ed.widget for ed in self.form.editors.values() if ed.live}
            if not any(w is focus or w.isAncestorOf(focus) for w in live):
                focus.clearFocus()
        why = "Locked while a run goes: stop the run to pick another model or dataset."
        self.model.set_locked(running, why)
        self.data.set_locked(running, why)
        for w in (self.load_button, self.presets_button):
            w.setEnabled(not running)
        self.reset_button.setEnabled(not running)
        self.form.set_running(running, cfg)
        self.scroll.verticalScrollBar().setValue(top)

    # ------------------------------------------------------------------ presets

    def load_preset(self, path: str | Path) -> bool:
        try:
            cfg = cfgmod.load(path)
        except ConfigError as e:
            self.message.emit("error", f"could not load {path}: {e.one_line()}")
            return False
        self.set_config(cfg)
        self.preset = (Path(path).name, cfg)
        self.set_origin(f"preset {Path(path).name}", cfg)
        self.preset_dir = str(Path(path).parent)
        self.message.emit("info", f"loaded settings from {path}")
        self.preset_loaded.emit(str(path))
        return True

    def save_preset(self, path: str | Path) -> bool:
        try:
            cfg = self.config()
        except ConfigError as e:
            self.message.emit("error", f"not saved, fix this first: {e.one_line()}")
            return False
        p = Path(path)
        if not p.suffix:
            p = p.with_suffix(".yaml")
        cfgmod.save(cfg, p)
        self.preset_dir = str(p.parent)
        self.message.emit("info", f"saved settings to {p}")
        return True

    def load_preset_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Load settings", self.preset_dir, "YAML (*.yaml *.yml);;All (*)"
        )
        if path:
            self.load_preset(path)

    def save_preset_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Save settings as", self.preset_dir, "YAML (*.yaml *.yml)"
        )
        if path:
            self.save_preset(path)

    def _fill_presets_menu(self) -> None:
        self.presets_menu.clear()
        files = sorted(PRESETS_DIR.glob("*.yaml")) if PRESETS_DIR.is_dir() else []
        for f in files:
            act = self.presets_menu.addAction(f.stem)
            act.setToolTip(str(f))
            act.triggered.connect(lambda _=False, p=f: self.load_preset(p))
        if not files:
            self.presets_menu.addAction("(no presets found)").setEnabled(False)
