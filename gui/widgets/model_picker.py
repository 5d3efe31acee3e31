"""Model picker: the builtin tiny model, a hub id (typed or from the recent list) or a local folder."""

from __future__ import annotations

import json
from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QComboBox, QFileDialog, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from tunedeck.engine import config as cfgmod
from tunedeck.engine import paths
from tunedeck.engine.builtin import TINY

SUGGESTED = [
    TINY,
    "HuggingFaceTB/SmolLM2-135M-Instruct",
    "Qwen/Qwen2.5-0.5B-Instruct",
    "meta-llama/Llama-3.2-1B",
]


def missing_folder(name: str) -> str | None:
    missing = paths.missing_model(name)
    return missing.one_line() if missing else None


def describe(name: str) -> tuple[str, bool]:
    """(a line about what ``name`` is, whether it looks usable)."""
    if not name:
        return "choose a model", False
    if name == TINY:
        return "builtin tiny Llama: no download, trains on a CPU in seconds; for trying things out", True
    p = Path(name).expanduser()
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            return f"folder {p} has no config.json: not a saved Hugging Face model", False
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
            arch = ", ".join(data.get("architectures") or []) or data.get("model_type", "?")
        except (OSError, ValueError):
            arch = "unreadable config.json"
        return f"local folder · {arch}", True
    missing = missing_folder(name)
    if missing:
        return missing, False
    return "hub id · downloaded on Start unless already in the Hugging Face cache", True


class ModelPicker(QWidget):
    changed = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.combo = QComboBox()
        self.combo.setEditable(True)
        self.combo.setObjectName("model.name_or_path")
        self.combo.addItems(SUGGESTED)
        self.combo.setToolTip(f"<b>model.name_or_path</b><br>{cfgmod.field_help('model', 'name_or_path')}")
        self.combo.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.folder = QPushButton("Folder…")
        self.folder.setToolTip(
            "Choose a local model folder (saved with save_pretrained: config.json + weights)."
        )
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.combo, 1)
        row.addWidget(self.folder)
        self.info = QLabel()
        self.info.setWordWrap(True)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(row)
        lay.addWidget(self.info)
        self.start_dir = str(Path.home())
        self.combo.currentTextChanged.connect(self._edited)
        self.folder.clicked.connect(self.choose_folder)
        self._edited(self.value())

    def value(self) -> str:
        return self.combo.currentText().strip()

    def set_value(self, name: str) -> None:
        self.combo.setCurrentText(name)

    def set_recent(self, names: list[str]) -> None:
        current = self.value()
        self.combo.blockSignals(True)
        self.combo.clear()
        seen = []
        for n in [*SUGGESTED[:1], *names, *SUGGESTED[1:]]:
            if n and n not in seen:
                seen.append(n)
        self.combo.addItems(seen)
        self.combo.setCurrentText(current)
        self.combo.blockSignals(False)

    def check(self) -> str | None:
        """The engine's complaint about the name itself, then a local folder that does not exist, or None."""
        return cfgmod.problem("model", "name_or_path", self.value()) or missing_folder(self.value())

    def set_locked(self, locked: bool, why: str = "") -> None:
        self.combo.setEnabled(not locked)
        self.folder.setEnabled(not locked)

    def choose_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose a model folder", self.start_dir)
        if path:
            self.start_dir = str(Path(path).parent)
            self.set_value(path)

    def _edited(self, text: str) -> None:
        line, ok = describe(text.strip())
        err = self.check()
        if err:
            line, ok = err, False
        color = "#8a9099" if ok else "#ff8a8f"
        self.info.setText(f"<span style='color:{color}'>{line}</span>")
        self.changed.emit(text)
