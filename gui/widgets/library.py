"""The run library: the runs folder as a tree; select runs to overlay them, open, rename, delete.

The summaries come from :mod:`tunedeck.gui.run_library` (no Qt). A run resumed into a new folder sits
under the run it came from (under that run's branch, when it was resumed from a branch's checkpoint),
and the branches a run's rollbacks left behind sit under the run, so a run's history reads as a tree.
Selecting runs overlays them on the plots, each in its own colour (shown by its name); double-click
(or Open) makes a run the one shown (a branch: its run, the branch drawn faded); Rename, Delete
(after asking) and Reveal act on the folder; Follow watches a live one. The run going in this window
can be neither renamed nor deleted.
"""

from __future__ import annotations

import html
import time
from pathlib import Path

from PySide6.QtCore import QPoint, Qt, QUrl, Signal
from PySide6.QtGui import QBrush, QColor, QDesktopServices, QIcon, QPixmap
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
    QTreeWidget,
    QTreeWidgetItem,
    QTreeWidgetItemIterator,
    QVBoxLayout,
    QWidget,
)

from tunedeck.gui import run_library
from tunedeck.gui.history import fmt_duration, fmt_number
from tunedeck.gui.run_library import BranchSummary, RunSummary
from tunedeck.gui.widgets.theme import MUTED, OVERLAY_COLORS

COLUMNS = ["name", "date", "status", "steps", "final loss", "best eval", "duration", "model", "dataset"]


def swatch(color: str) -> QIcon:
    pix = QPixmap(12, 12)
    pix.fill(QColor(color))
    return QIcon(pix)


PATH = Qt.ItemDataRole.UserRole  # a run item's folder ("" on a branch item)
COLOR = Qt.ItemDataRole.UserRole + 1  # the overlay colour of a run item, when overlaid
BRANCH = Qt.ItemDataRole.UserRole + 2  # a branch item's number


class SortItem(QTreeWidgetItem):
    """A row of the tree; sorts by hidden keys per column (numbers as numbers, dates by time), shows
    the text. Sorting orders the runs at each level; children stay under their parent."""

    def __init__(self, cells: list[tuple[str, object]]) -> None:
        super().__init__([text for text, _ in cells])
        self.keys = [key for _, key in cells]

    def __lt__(self, other: QTreeWidgetItem) -> bool:
        tree = self.treeWidget()
        c = tree.sortColumn() if tree is not None else 0
        a, b = self.keys[c], getattr(other, "keys", [None] * (c + 1))[c]
        try:
            return bool(a < b)  # type: ignore[operator]
        except TypeError:
            return str(a) < str(b)


class RunLibrary(QWidget):
    overlay_requested = Signal(list)  # run folders to overlay, in selection order
    open_requested = Signal(str)  # a run folder to show
    follow_requested = Signal(str)  # a live run folder to follow
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

        self.table = QTreeWidget()
        self.table.setColumnCount(len(COLUMNS))
        self.table.setHeaderLabels(COLUMNS)
        self.table.setRootIsDecorated(True)
        self.table.setUniformRowHeights(True)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(1, Qt.SortOrder.DescendingOrder)  # newest first
        self.table.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        hh = self.table.header()
        hh.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        hh.setStretchLastSection(True)
        self.table.setToolTip(
            "Select runs to overlay them on the plots; double-click to open one. A run resumed into a "
            "new folder sits under the run it came from; a rollback's abandoned steps are a branch."
        )
        self.table.setMinimumHeight(50)

        self.open_button = QPushButton("Open")
        self.open_button.setToolTip("Show this run's curves, summary and settings.")
        self.rename_button = QPushButton("Rename…")
        self.delete_button = QPushButton("Delete…")
        self.reveal_button = QPushButton("Reveal")
        self.reveal_button.setToolTip("Show the run folder in the file manager.")
        self.follow_button = QPushButton("Follow")
        self.follow_button.setToolTip(
            "Watch and steer this live run (one started from a terminal, say) with the plots and controls."
        )
        self.hint = QLabel("Select runs to overlay them.")
        self.hint.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.hint.setStyleSheet(f"color: {MUTED};")
        row = QHBoxLayout()
        row.setContentsMargins(4, 2, 4, 2)
        for b in (
            self.open_button,
            self.follow_button,
            self.rename_button,
            self.delete_button,
            self.reveal_button,
        ):
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
        self.table.itemDoubleClicked.connect(lambda item, _c: self._open_item(item))
        self.table.customContextMenuRequested.connect(self._context_menu)
        self.open_button.clicked.connect(
            lambda: self.selected() and self.open_requested.emit(self.selected()[0])
        )
        self.rename_button.clicked.connect(self.rename_dialog)
        self.delete_button.clicked.connect(self.delete_selected)
        self.reveal_button.clicked.connect(lambda: [self.reveal(p) for p in self.selected()[:1]])
        self.follow_button.clicked.connect(
            lambda: self.selected() and self.follow_requested.emit(self.selected()[0])
        )
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
        # runs open, unless the user folded them
        folded = {self._key(i) for i in self.items() if i.childCount() and not i.isExpanded()}
        self.summaries = run_library.list_runs(self.folder) if self.folder else []
        t = self.table
        t.blockSignals(True)
        t.setSortingEnabled(False)
        t.clear()
        tree = run_library.family(self.summaries)
        placed: set[str] = set()

        def add(parent: QTreeWidget | QTreeWidgetItem, s: RunSummary) -> None:
            item = self._run_item(s)
            placed.add(s.path)
            if isinstance(parent, QTreeWidget):
                parent.addTopLevelItem(item)
            else:
                parent.addChild(item)
            under: dict[int, QTreeWidgetItem] = {}
            for b in s.branches:
                under[b.number] = self._branch_item(b)
                item.addChild(under[b.number])
            for branch, child in tree.get(s.path, []):
                if child.path not in placed:  # a folder that names itself an ancestor: listed once
                    add(under.get(branch, item) if branch is not None else item, child)
            for i in (item, *under.values()):
                i.setExpanded(self._key(i) not in folded)

        for _, s in tree[None]:
            add(t, s)
        for s in self.summaries:  # a loop of parents (hand-edited files): still listed
            if s.path not in placed:
                add(t, s)
        t.setSortingEnabled(True)
        t.clearSelection()
        for item in self.items():
            if self._path(item) in selected:
                item.setSelected(True)
        t.blockSignals(False)
        self._color_rows()
        self._update_buttons()

    def _run_item(self, s: RunSummary) -> SortItem:
        be = s.best_eval
        steps = f"{s.steps:,}" + (
            f" / {s.total_steps:,}" if s.total_steps and s.total_steps != s.steps else ""
        )
        item = SortItem(
            [
                (s.name, s.name.lower()),
                (s.date, s.started),
                (s.status, s.status),
                (steps, s.steps),
                (fmt_number(s.final_loss) if s.final_loss is not None else "–", s.final_loss or 0.0),
                (f"{fmt_number(be[1])} @ {be[0]:,}" if be else "–", be[1] if be else float("inf")),
                (fmt_duration(s.duration_s), s.duration_s or 0.0),
                (s.model, s.model),
                (s.dataset, s.dataset),
            ]
        )
        item.setData(0, PATH, s.path)
        tip = s.path
        if s.parent is not None:
            where = f"branch {s.parent.branch} of " if s.parent.branch is not None else ""
            at = f" at step {s.parent.step:,}" if s.parent.step is not None else ""
            tip += f"\nresumed from {where}{Path(s.parent.path).name}{at} ({s.parent.checkpoint})"
        if s.branches:
            tip += f"\n{len(s.branches)} branch{'es' if len(s.branches) > 1 else ''} left by rollbacks"
        item.setToolTip(0, tip)
        for c in range(1, len(COLUMNS)):
            item.setToolTip(c, item.text(c))
        return item

    def _branch_item(self, b: BranchSummary) -> SortItem:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(b.time)) if b.time else ""
        loss = fmt_number(b.final_loss) if b.final_loss is not None else "–"
        item = SortItem(
            [
                (f"branch {b.number}", f"~branch {b.number:06d}"),
                (when, b.time),
                ("rolled back", "rolled back"),
                (f"{b.to_step + 1:,}–{b.from_step:,}", b.from_step),
                (loss, b.final_loss or 0.0),
                ("", float("inf")),
                ("", 0.0),
                ("", ""),
                ("", ""),
            ]
        )
        item.setData(0, PATH, "")
        item.setData(0, BRANCH, b.number)
        item.setFlags(Qt.ItemFlag.ItemIsEnabled)  # not a run: not selectable, not overlaid
        kept = f"; kept in branches/{b.number}/: {', '.join(b.kept)}" if b.kept else ""
        tip = (
            f"Steps {b.to_step + 1:,} to {b.from_step:,} ({b.steps:,}), left behind by a rollback to "
            f"{b.checkpoint}{kept}. Open the run to see them faded on its plots."
        )
        muted = QBrush(QColor(MUTED))
        for c in range(len(COLUMNS)):
            item.setToolTip(c, tip)
            item.setForeground(c, muted)
        return item

    def items(self) -> list[QTreeWidgetItem]:
        """Every item of the tree, in the order shown (runs and branches)."""
        out = []
        it = QTreeWidgetItemIterator(self.table)
        while it.value() is not None:
            out.append(it.value())
            it += 1
        return out

    def _path(self, item: QTreeWidgetItem) -> str:
        return str(item.data(0, PATH) or "")

    def _key(self, item: QTreeWidgetItem) -> str:
        """A run's folder, or its run's folder and number for a branch (kept across refreshes)."""
        branch = item.data(0, BRANCH)
        if branch is None:
            return self._path(item)
        parent = item.parent()
        return f"{self._path(parent) if parent is not None else ''}#branch {branch}"

    def item_of(self, path: str) -> QTreeWidgetItem | None:
        """The item of a run folder (None when it is not listed)."""
        return next((i for i in self.items() if self._path(i) == str(path)), None)

    def branch_items(self, path: str) -> list[QTreeWidgetItem]:
        """The branch items under a run's item."""
        item = self.item_of(path)
        if item is None:
            return []
        return [item.child(k) for k in range(item.childCount()) if item.child(k).data(0, BRANCH) is not None]

    def summary_of(self, path: str) -> RunSummary | None:
        return next((s for s in self.summaries if s.path == str(path)), None)

    def selected(self) -> list[str]:
        """Selected run folders, in the order the tree shows them."""
        return [p for i in self.items() if i.isSelected() and (p := self._path(i))]

    def select(self, paths: list[str]) -> None:
        t = self.table
        t.blockSignals(True)
        t.clearSelection()
        for p in paths:
            item = self.item_of(p)
            if item is not None:
                item.setSelected(True)
        t.blockSignals(False)
        self._selection_changed()

    def _color_rows(self) -> None:
        """The name of each overlaid run in its overlay colour (as on the plots)."""
        chosen = self.selected()
        for item in self.items():
            p = self._path(item)
            if not p:
                continue
            if p in chosen:
                color = OVERLAY_COLORS[chosen.index(p) % len(OVERLAY_COLORS)]
                item.setIcon(0, swatch(color))  # an icon keeps its colour in a selected row
                item.setData(0, COLOR, color)
            else:
                item.setIcon(0, QIcon())
                item.setData(0, COLOR, None)

    def _selection_changed(self) -> None:
        self._color_rows()
        self._update_buttons()
        self.overlay_requested.emit(self.selected())

    def _update_buttons(self) -> None:
        sel = self.selected()
        one = len(sel) == 1
        busy = bool(self.busy_path) and any(p == self.busy_path for p in sel)
        self.open_button.setEnabled(one)
        live = one and (summary := self.summary_of(sel[0])) is not None and summary.status == "running"
        self.follow_button.setEnabled(bool(live) and not busy)
        self.rename_button.setEnabled(one and not busy)
        self.delete_button.setEnabled(bool(sel) and not busy)
        self.reveal_button.setEnabled(one)
        why = "the run going now cannot be renamed or deleted" if busy else ""
        n = len(sel)
        self.hint.setText(why or (f"{n} runs overlaid" if n > 1 else "Select runs to overlay them."))

    def _open_item(self, item: QTreeWidgetItem) -> None:
        # a branch opens its run: the branch is drawn there, faded
        p = self._path(item) or (self._path(item.parent()) if item.parent() is not None else "")
        if p:
            self.open_requested.emit(p)

    def _context_menu(self, pos: QPoint) -> None:
        if not self.selected():
            return
        m = QMenu(self)
        for b in (
            self.open_button,
            self.follow_button,
            self.rename_button,
            self.delete_button,
            self.reveal_button,
        ):
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
