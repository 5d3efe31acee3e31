"""Run setup: model, dataset, presets and the hyperparameter form, as one scrollable panel.

:meth:`SetupPanel.config` builds the engine's ``Config`` from all of them through
``tunedeck.engine.config.from_dict``, so the rules between settings (4-bit needs LoRA, ...) are the engine's
own; :attr:`problem` holds the first thing to fix, in the engine's words, and is shown in red
above the form. A local dataset file or model folder that does not exist is one too (the pickers'
``check``), so Start is refused up front rather than failing the run. Presets are plain config
YAML files (``tunedeck.engine.config.load`` / ``save``).
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
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
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(inner)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)

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

    def revalidate(self, *_args) -> bool:
        try:
            self.config()
            problem = None
        except ConfigError as e:
            problem = e.one_line()
        changed = problem != self.problem
        self.problem = problem
        n = len(self.form.errors()) + bool(self.model.check()) + bool(self.data.check())
        if problem:
            head = f"{n} settings need fixing: " if n > 1 else ""
            self.problem_label.setText(head + problem)
        self.problem_label.setVisible(bool(problem))
        if changed:
            self.validity_changed.emit(problem is None)
        return problem is None

    def set_running(self, running: bool, cfg: Config | None = None) -> None:
        why = "Locked while a run goes: stop the run to pick another model or dataset."
        self.model.set_locked(running, why)
        self.data.set_locked(running, why)
        for w in (self.load_button, self.presets_button):
            w.setEnabled(not running)
        self.form.set_running(running, cfg)

    # ------------------------------------------------------------------ presets

    def load_preset(self, path: str | Path) -> bool:
        try:
            cfg = cfgmod.load(path)
        except ConfigError as e:
            self.message.emit("error", f"could not load {path}: {e.one_line()}")
            return False
        self.set_config(cfg)
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
