"""The run library: the runs folder as a table; select runs to overlay them, open, rename, delete.

The summaries come from :mod:`tunedeck.gui.run_library` (no Qt). Selecting rows overlays those runs
on the plots, each in its own colour (shown by its name); double-click (or Open) makes a run the
one shown; Rename, Delete (after asking) and Reveal act on the folder. The run going in this window
can be neither renamed nor deleted.
"""

from __future__ import annotations

import html
from pathlib import Path

from PySide6.QtCore import QPoint, Qt, QUrl, Signal
from PySide6.QtGui import QColor, QDesktopServices, QIcon, QPixmap
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QHeaderView,
    QInputDialog,
    QLabel,
    QMenu,
    QMessageBox,
    QPushButton,
    QSizePolicy,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from tunedeck.gui import run_library
from tunedeck.gui.history import fmt_duration, fmt_number
from tunedeck.gui.run_library import RunSummary
from tunedeck.gui.widgets.theme import MUTED, OVERLAY_COLORS

COLUMNS = ["name", "date", "status", "steps", "final loss", "best eval", "duration", "model", "dataset"]


def swatch(color: str) -> QIcon:
    pix = QPixmap(12, 12)
    pix.fill(QColor(color))
    return QIcon(pix)


class SortItem(QTableWidgetItem):
    """Sorts by a hidden key (numbers as numbers, dates by time), shows the text."""

    def __init__(self, text: str, key: object) -> None:
        super().__init__(text)
        self.key = key

    def __lt__(self, other: QTableWidgetItem) -> bool:
        k2 = getattr(other, "key", None)
        try:
            return bool(self.key < k2)  # type: ignore[operator]
        except TypeError:
            return str(self.key) < str(k2)


class RunLibrary(QWidget):
    overlay_requested = Signal(list)  # run folders to overlay, in selection order
    open_requested = Signal(str)  # a run folder to show
    folder_change_requested = Signal()  # the user wants to pick another runs folder
    message = Signal(str, str)  # (level, text) for the log

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.folder = ""
        self.busy_path: str | None = None  # the run going in this window
        self.summaries: list[RunSummary] = []
        self.folder_label = QLabel()
        self.folder_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.folder_label.setStyleSheet(f"color: {MUTED};")
        self.folder_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.change_button = QPushButton("Folder…")
        self.change_button.setToolTip("Choose the runs folder (where new runs from this window go).")
        self.refresh_button = QPushButton("Refresh")
        top = QHBoxLayout()
        top.setContentsMargins(4, 2, 4, 2)
        top.addWidget(self.folder_label, 1)
        top.addWidget(self.change_button)
        top.addWidget(self.refresh_button)

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.verticalHeader().setDefaultSectionSize(22)
        self.table.setSortingEnabled(True)
        self.table.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        hh = self.table.horizontalHeader()
        hh.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        hh.setStretchLastSection(True)
        self.table.setToolTip("Select runs to overlay them on the plots; double-click to open one.")
        self.table.setMinimumHeight(50)

        self.open_button = QPushButton("Open")
        self.open_button.setToolTip("Show this run's curves, summary and settings.")
        self.rename_button = QPushButton("Rename…")
        self.delete_button = QPushButton("Delete…")
        self.reveal_button = QPushButton("Reveal")
        self.reveal_button.setToolTip("Show the run folder in the file manager.")
        self.hint = QLabel("Select runs to overlay them.")
        self.hint.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.hint.setStyleSheet(f"color: {MUTED};")
        row = QHBoxLayout()
        row.setContentsMargins(4, 2, 4, 2)
        for b in (self.open_button, self.rename_button, self.delete_button, self.reveal_button):
            row.addWidget(b)
        row.addWidget(self.hint, 1)

        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(0)
        lay.addLayout(top)
        lay.addWidget(self.table, 1)
        lay.addLayout(row)

        self.change_button.clicked.connect(self.folder_change_requested.emit)
        self.refresh_button.clicked.connect(self.refresh)
        self.table.itemSelectionChanged.connect(self._selection_changed)
        self.table.cellDoubleClicked.connect(lambda r, _c: self._open_row(r))
        self.table.customContextMenuRequested.connect(self._context_menu)
        self.open_button.clicked.connect(
            lambda: self.selected() and self.open_requested.emit(self.selected()[0])
        )
        self.rename_button.clicked.connect(self.rename_dialog)
        self.delete_button.clicked.connect(self.delete_selected)
        self.reveal_button.clicked.connect(lambda: [self.reveal(p) for p in self.selected()[:1]])
        self._update_buttons()

    # ------------------------------------------------------------------ contents

    def set_folder(self, folder: str) -> None:
        self.folder = folder
        self.folder_label.setText(f"Runs folder: {html.escape(folder)}")
        self.folder_label.setToolTip(folder)
        self.refresh()

    def refresh(self) -> None:
        """Read the runs folder again (runs that did not change come from the cache)."""
        selected = set(self.selected())
        self.summaries = run_library.list_runs(self.folder) if self.folder else []
        t = self.table
        t.blockSignals(True)
        t.setSortingEnabled(False)
        t.setRowCount(len(self.summaries))
        for r, s in enumerate(self.summaries):
            be = s.best_eval
            cells = [
                (s.name, s.name.lower()),
                (s.date, s.started),
                (s.status, s.status),
                (
                    f"{s.steps:,}"
                    + (f" / {s.total_steps:,}" if s.total_steps and s.total_steps != s.steps else ""),
                    s.steps,
                ),
                (fmt_number(s.final_loss) if s.final_loss is not None else "–", s.final_loss or 0.0),
                (f"{fmt_number(be[1])} @ {be[0]:,}" if be else "–", be[1] if be else float("inf")),
                (fmt_duration(s.duration_s), s.duration_s or 0.0),
                (s.model, s.model),
                (s.dataset, s.dataset),
            ]
            for c, (text, key) in enumerate(cells):
                item = SortItem(text, key)
                item.setData(Qt.ItemDataRole.UserRole, s.path)
                item.setToolTip(s.path if c == 0 else text)
                t.setItem(r, c, item)
        t.setSortingEnabled(True)
        t.clearSelection()
        for r in range(t.rowCount()):
            if self._path(r) in selected:
                t.selectRow(r)
        t.blockSignals(False)
        self._color_rows()
        self._update_buttons()

    def _path(self, row: int) -> str:
        item = self.table.item(row, 0)
        return str(item.data(Qt.ItemDataRole.UserRole)) if item is not None else ""

    def row_of(self, path: str) -> int:
        return next((r for r in range(self.table.rowCount()) if self._path(r) == str(path)), -1)

    def selected(self) -> list[str]:
        """Selected run folders, in the order the table shows them."""
        rows = sorted({i.row() for i in self.table.selectedIndexes()})
        return [self._path(r) for r in rows]

    def select(self, paths: list[str]) -> None:
        t = self.table
        t.blockSignals(True)
        t.clearSelection()
        mode = t.selectionMode()
        t.setSelectionMode(QAbstractItemView.SelectionMode.MultiSelection)
        for p in paths:
            r = self.row_of(p)
            if r >= 0:
                t.selectRow(r)
        t.setSelectionMode(mode)
        t.blockSignals(False)
        self._selection_changed()

    def _color_rows(self) -> None:
        """The name of each overlaid run in its overlay colour (as on the plots)."""
        chosen = self.selected()
        for r in range(self.table.rowCount()):
            item = self.table.item(r, 0)
            if item is None:
                continue
            p = self._path(r)
            if p in chosen:
                color = OVERLAY_COLORS[chosen.index(p) % len(OVERLAY_COLORS)]
                item.setIcon(swatch(color))  # an icon keeps its colour in a selected row
                item.setData(Qt.ItemDataRole.UserRole + 1, color)
            else:
                item.setIcon(QIcon())
                item.setData(Qt.ItemDataRole.UserRole + 1, None)

    def _selection_changed(self) -> None:
        self._color_rows()
        self._update_buttons()
        self.overlay_requested.emit(self.selected())

    def _update_buttons(self) -> None:
        sel = self.selected()
        one = len(sel) == 1
        busy = bool(self.busy_path) and any(p == self.busy_path for p in sel)
        self.open_button.setEnabled(one)
        self.rename_button.setEnabled(one and not busy)
        self.delete_button.setEnabled(bool(sel) and not busy)
        self.reveal_button.setEnabled(one)
        why = "the run going now cannot be renamed or deleted" if busy else ""
        n = len(sel)
        self.hint.setText(why or (f"{n} runs overlaid" if n > 1 else "Select runs to overlay them."))

    def _open_row(self, row: int) -> None:
        p = self._path(row)
        if p:
            self.open_requested.emit(p)

    def _context_menu(self, pos: QPoint) -> None:
        if not self.selected():
            return
        m = QMenu(self)
        for b in (self.open_button, self.rename_button, self.delete_button, self.reveal_button):
            a = m.addAction(b.text())
            a.setEnabled(b.isEnabled())
            a.triggered.connect(b.click)
        m.exec(self.table.viewport().mapToGlobal(pos))

    # ------------------------------------------------------------------ actions

    def rename(self, path: str, new_name: str) -> str | None:
        """Rename a run folder; returns the new path, or None (with a message) when refused."""
        if self.busy_path and path == self.busy_path:
            self.message.emit("error", "the run going now cannot be renamed; rename it after it ends")
            return None
        try:
            target = run_library.rename_run(path, new_name)
        except (ValueError, OSError) as e:
            self.message.emit("error", f"not renamed: {e}")
            return None
        self.message.emit("info", f"renamed run {Path(path).name} to {target.name}")
        self.refresh()
        return str(target)

    def rename_dialog(self) -> None:
        sel = self.selected()
        if len(sel) != 1:
            return
        name, ok = QInputDialog.getText(
            self, "Rename run", "New name of the run folder:", text=Path(sel[0]).name
        )
        if ok and name.strip() and name.strip() != Path(sel[0]).name:
            self.rename(sel[0], name)

    def ask_delete(self, paths: list[str]) -> bool:
        size = sum(run_library.folder_size(p) for p in paths) / 1024**2
        names = ", ".join(Path(p).name for p in paths[:5]) + (" …" if len(paths) > 5 else "")
        box = QMessageBox(self)
        box.setIcon(QMessageBox.Icon.Warning)
        box.setWindowTitle("Delete runs")
        box.setText(f"Delete {len(paths)} run folder{'s' if len(paths) > 1 else ''} ({size:,.1f} MB)?")
        box.setInformativeText(f"{names}\n\nTheir checkpoints, adapters and metrics are removed from disk.")
        delete = box.addButton("Delete", QMessageBox.ButtonRole.DestructiveRole)
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.setDefaultButton(QMessageBox.StandardButton.Cancel)
        box.exec()
        return box.clickedButton() is delete

    def delete(self, paths: list[str]) -> int:
        """Delete the run folders after asking (:meth:`ask_delete`); returns how many were deleted."""
        if self.busy_path and self.busy_path in paths:
            self.message.emit("error", "the run going now cannot be deleted; stop it first")
            return 0
        if not paths or not self.ask_delete(paths):
            return 0
        done = 0
        for p in paths:
            try:
                run_library.delete_run(p)
                done += 1
            except (ValueError, OSError) as e:
                self.message.emit("error", f"not deleted: {e}")
        if done:
            self.message.emit("info", f"deleted {done} run folder{'s' if done > 1 else ''}")
        self.refresh()
        self.overlay_requested.emit(self.selected())
        return done

    def delete_selected(self) -> None:
        self.delete(self.selected())

    def reveal(self, path: str) -> bool:
        return QDesktopServices.openUrl(QUrl.fromLocalFile(path))
