"""Dataset picker: a path (file, hub name or builtin:demo) with a preview of the first rows.

The preview comes from ``tunedeck.engine.data.preview`` (detected format, first rows, row count). It runs in
a worker thread, since a hub dataset may have to be downloaded. The worker holds no Qt object (so
none can be destroyed off the main thread): it drops its answer in a queue that a main-thread
timer collects; a newer path always wins over a slower, older preview.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path
from typing import Any

from PySide6.QtCore import QTimer, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from tunedeck.engine import config as cfgmod
from tunedeck.engine import paths
from tunedeck.engine.builtin import DEMO
from tunedeck.engine.errors import ConfigError, TunedeckError

PREVIEW_ROWS = 5
CELL_CHARS = 160


def cell_text(value: Any) -> str:
    """A compact one-cell rendering of a column value (chat messages as 'role: text' lines)."""
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return "" if value is None else str(value)


def _preview_worker(req: int, path: str, answers: queue.SimpleQueue) -> None:
    try:
        from tunedeck.engine.data import preview

        result: Any = preview(path, n=PREVIEW_ROWS)
    except Exception as e:  # shown in the picker; never raised into Qt
        result = e
    answers.put((req, result))


class DataPicker(QWidget):
    changed = Signal(str)
    previewed = Signal(str)  # the detected format, or "" when the preview failed

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.path_edit = QLineEdit(DEMO)
        self.path_edit.setObjectName("data.path")
        self.path_edit.setToolTip(
            f"<b>data.path</b><br>{cfgmod.field_help('data', 'path')}<br>"
            "<i>Columns decide the format: prompt/completion, instruction/input/output (alpaca), messages "
            "(chat), or text.</i>"
        )
        self.browse = QPushButton("File…")
        self.browse.setToolTip("Choose a .jsonl, .json, .csv or .parquet file.")
        self.demo = QPushButton("Demo")
        self.demo.setToolTip(
            "The builtin demo dataset, which the builtin tiny model learns in a minute on a CPU."
        )
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.path_edit, 1)
        row.addWidget(self.browse)
        row.addWidget(self.demo)
        self.info = QLabel()
        self.info.setWordWrap(True)
        self.table = QTableWidget(0, 0)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setWordWrap(True)
        self.table.setAlternatingRowColors(True)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.setMinimumHeight(120)
        self.table.setMaximumHeight(190)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(row)
        lay.addWidget(self.info)
        lay.addWidget(self.table)

        self.detected = ""
        self.total = 0
        self.error: str | None = None
        self._request = 0
        self._answered = 0
        self._answers: queue.SimpleQueue = queue.SimpleQueue()
        self._collect = QTimer(self)
        self._collect.setInterval(50)
        self._collect.timeout.connect(self._collect_answers)
        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(300)
        self._debounce.timeout.connect(self.refresh_preview)
        self.path_edit.textChanged.connect(self._edited)
        self.browse.clicked.connect(self.choose_file)
        self.demo.clicked.connect(lambda: self.set_value(DEMO))
        self.start_dir = str(Path.home())
        self.refresh_preview()

    # ------------------------------------------------------------------ value

    def value(self) -> str:
        return self.path_edit.text().strip()

    def set_value(self, path: str) -> None:
        if path != self.path_edit.text():
            self.path_edit.setText(path)
            self._debounce.stop()
            self.refresh_preview()

    def check(self) -> str | None:
        """The engine's complaint about the path itself (empty...), then a local file that does not
        exist, or None. Start stays off while there is one; the preview shows the engine's own words."""
        missing = paths.missing_dataset(self.value())
        return cfgmod.problem("data", "path", self.value()) or (missing.one_line() if missing else None)

    def set_locked(self, locked: bool, why: str = "") -> None:
        for w in (self.path_edit, self.browse, self.demo):
            w.setEnabled(not locked)
        self.path_edit.setToolTip(why if locked else self.path_edit.toolTip())

    def choose_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self,
            "Choose a dataset",
            self.start_dir,
            "Datasets (*.jsonl *.json *.csv *.parquet);;All files (*)",
        )
        if path:
            self.start_dir = str(Path(path).parent)
            self.set_value(path)

    def _edited(self, text: str) -> None:
        self.changed.emit(text)
        self._debounce.start()

    # ------------------------------------------------------------------ preview

    def refresh_preview(self) -> None:
        path = self.value()
        self._request += 1
        req = self._request
        if not path:
            self._show_preview(
                req, ConfigError("no dataset chosen", "pick a file, a hub dataset or builtin:demo")
            )
            return
        self.info.setText("<span style='color:#8a9099'>reading…</span>")
        threading.Thread(
            target=_preview_worker, args=(req, path, self._answers), name="tunedeck-preview", daemon=True
        ).start()
        self._collect.start()

    def _collect_answers(self) -> None:
        while True:
            try:
                req, result = self._answers.get_nowait()
            except queue.Empty:
                break
            self._show_preview(req, result)
        if self._answered == self._request:
            self._collect.stop()

    def _show_preview(self, req: int, result: Any) -> None:
        if req != self._request:
            return  # an older path's answer
        self._answered = req
        self.table.clear()
        if isinstance(result, BaseException):
            msg = (
                result.one_line()
                if isinstance(result, TunedeckError)
                else f"{type(result).__name__}: {result}"
            )
            self.detected, self.total, self.error = "", 0, msg
            self.info.setText(f"<span style='color:#ff8a8f'>{msg}</span>")
            self.table.setRowCount(0)
            self.table.setColumnCount(0)
            self.previewed.emit("")
            return
        fmt, rows, total = result
        self.detected, self.total, self.error = fmt, total, None
        self.info.setText(f"format <b>{fmt}</b> · {total:,} rows · first {len(rows)} shown")
        cols: list[str] = []
        for r in rows:
            for k in r:
                if k not in cols:
                    cols.append(k)
        self.table.setColumnCount(len(cols))
        self.table.setRowCount(len(rows))
        self.table.setHorizontalHeaderLabels(cols)
        for i, r in enumerate(rows):
            for j, c in enumerate(cols):
                full = cell_text(r.get(c))
                item = QTableWidgetItem(full if len(full) <= CELL_CHARS else full[:CELL_CHARS] + "…")
                item.setToolTip(full[:2000])
                self.table.setItem(i, j, item)
        self.table.resizeRowsToContents()
        self.previewed.emit(fmt)
