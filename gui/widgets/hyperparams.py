"""The hyperparameter form, generated from the engine's config dataclasses.

Every field of :mod:`tunedeck.engine.config` gets an editor chosen from its type (check box for bools, a
list for fields with ``choices``, a text box otherwise) and a tooltip built from its ``help``
metadata plus a longer note from :mod:`tunedeck.gui.widgets.knobs`. Each edit is checked at once with
``tunedeck.engine.config.validate_value``; a bad value is outlined in red with the engine's own message
under it. While a run goes, the keys in ``tunedeck.engine.config.LIVE_KEYS`` stay editable and an Apply
button sends only the changed ones; every other field is locked, with a tooltip saying why.
"""

from __future__ import annotations

import dataclasses
import html
import math
from typing import Any

import yaml
from PySide6.QtCore import QEvent, QObject, Qt, Signal
from PySide6.QtGui import QKeyEvent
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from tunedeck.engine import config as cfgmod
from tunedeck.engine.config import LIVE_KEYS, SECTIONS, Config
from tunedeck.engine.errors import ConfigError
from tunedeck.gui.widgets.knobs import EXTRA, LOCKED_TIP

# Fields edited elsewhere (the model and dataset pickers).
EXTERNAL = {"model.name_or_path", "data.path"}
QUANT = "quantization"  # one list for model.load_in_4bit / model.load_in_8bit
QUANT_CHOICES = {"none": (False, False), "4-bit (QLoRA, NF4)": (True, False), "8-bit": (False, True)}

GROUPS: list[tuple[str, list[str]]] = [
    (
        "Optimizer",
        [
            "train.learning_rate",
            "train.lr_scheduler_type",
            "train.warmup_ratio",
            "train.optim",
            "train.weight_decay",
            "train.max_grad_norm",
        ],
    ),
    (
        "Batch and length",
        [
            "train.per_device_train_batch_size",
            "train.gradient_accumulation_steps",
            "train.num_train_epochs",
            "train.max_steps",
            "data.max_length",
        ],
    ),
    ("LoRA", ["lora.enabled", "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules"]),
    ("Model and memory", ["model.dtype", QUANT, "model.gradient_checkpointing"]),
    ("Processes", ["train.distributed"]),  # under the processes field (not a config key: how it runs)
    ("Data", ["data.format", "data.completion_only_loss", "data.packing", "data.eval_fraction"]),
    ("Evaluation and saving", ["train.eval_steps", "train.save_steps", "train.output_dir", "train.run_name"]),
]
# Everything else goes under "Advanced" (collapsed), so a new engine field always gets an editor.

MAX_PROCESSES = 256
PROCESSES_TIP = (
    "<b>processes</b><br>1: the run trains in this window's own thread. N &gt; 1: the window starts "
    "<tt>tunedeck-train --nproc-per-node N</tt> (PyTorch's torchrun: one process per GPU; gloo on a CPU) "
    "as a process of its own and follows its run folder, with the same plots and controls; closing the "
    "window asks what to do with the run, as for one in its thread.<br><i>train.distributed</i> says "
    "how the processes share the work."
)
NO_DISTRIBUTED_TIP = "This PyTorch build has no torch.distributed: runs go in one process."
ONE_PROCESS_TIP = "Used with processes above 1 only: one process runs the whole model itself."

RUNNING_HINT = "The run is going: the enabled fields change it live. Edit them, then Apply (or Enter)."
PAUSED_HINT = "The run is paused: Apply (or Enter) changes it now; training goes on with it on Resume."

LABELS = {
    "train.learning_rate": "learning rate",
    "train.lr_scheduler_type": "scheduler",
    "train.warmup_ratio": "warm-up ratio",
    "train.warmup_steps": "warm-up steps",
    "train.optim": "optimizer",
    "train.per_device_train_batch_size": "batch size",
    "train.per_device_eval_batch_size": "eval batch size",
    "train.gradient_accumulation_steps": "grad accumulation",
    "train.num_train_epochs": "epochs",
    "train.max_steps": "max steps",
    "train.max_grad_norm": "max grad norm",
    "train.eval_steps": "eval every",
    "train.save_steps": "save every",
    "train.lr_scheduler_kwargs": "scheduler options",
    "lora.enabled": "LoRA adapters",
    "lora.r": "rank r",
    "lora.target_modules": "target modules",
    "data.max_length": "max length",
    "data.completion_only_loss": "loss on answers only",
    "model.gradient_checkpointing": "gradient checkpointing",
    QUANT: "quantization",
}

RUNNING_HINT = "The run is going: the fields still enabled below change it live. Edit them, then Apply."

SUGGESTIONS = {
    "lora.target_modules": ["q_proj, k_proj, v_proj, o_proj", "all-linear", "q_proj, v_proj"],
}


def distributed_available() -> bool:
    """Whether this torch can run a process group (torch.distributed), which N > 1 processes need."""
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return bool(dist.is_available())


def fmt_value(v: Any) -> str:
    """Text for an editor that reads back to exactly ``v`` (1e-4 rather than 0.0001)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isfinite(v) and v != 0 and abs(v) < 1e-2:
            for digits in range(0, 17):
                mant, exp = f"{v:.{digits}e}".split("e")
                if float(f"{mant}e{exp}") == v:
                    return f"{mant}e{int(exp)}"
        text = repr(v)
        return text[:-2] if text.endswith(".0") else text
    if isinstance(v, (list, tuple)) and any(isinstance(m, dict) for m in v):  # train.autopilot's rules
        return yaml.safe_dump(list(v), default_flow_style=True, sort_keys=False).strip()
    if isinstance(v, (list, tuple)):
        return ", ".join(str(m) for m in v)
    if isinstance(v, dict):
        return yaml.safe_dump(v, default_flow_style=True).strip() if v else "{}"
    return "" if v is None else str(v)


def tooltip(dotted: str, live: bool) -> str:
    if dotted == QUANT:
        helps = [cfgmod.field_help("model", "load_in_4bit"), cfgmod.field_help("model", "load_in_8bit")]
        name = "model.load_in_4bit / model.load_in_8bit"
    else:
        section, key = dotted.split(".", 1)
        helps = [cfgmod.field_help(section, key)]
        name = dotted
    parts = [f"<b>{html.escape(name)}</b>"] + [html.escape(h) for h in helps if h]
    if dotted in EXTRA:
        parts.append(f"<i>{html.escape(EXTRA[dotted])}</i>")
    if live:
        parts.append("<span style='color:#4fd1a5'>Can be changed while a run goes (Apply).</span>")
    return "<p style='white-space:pre-wrap; max-width:420px'>" + "<br>".join(parts) + "</p>"


class FieldEditor(QObject):
    """One setting: its label, editor, inline error, lock state and 'changed during the run' mark."""

    changed = Signal()

    def __init__(self, dotted: str) -> None:
        super().__init__()
        self.dotted = dotted
        if dotted == QUANT:
            self.section, self.key = "model", QUANT
            self.typ, self.choices = str, tuple(QUANT_CHOICES)
        else:
            self.section, self.key = dotted.split(".", 1)
            self.typ = cfgmod.field_type(self.section, self.key)
            self.choices = cfgmod.field_choices(self.section, self.key)
        self.live = self.section == "train" and self.key in LIVE_KEYS
        self.tip = tooltip(dotted, self.live)
        self.label = QLabel(LABELS.get(dotted, self.key.replace("_", " ")))
        self.label.setToolTip(self.tip)
        if self.typ is bool:
            self.widget: QWidget = QCheckBox()
            self.widget.toggled.connect(self._edited)
        elif self.choices:
            self.widget = QComboBox()
            self.widget.addItems(list(self.choices))
            self.widget.currentTextChanged.connect(self._edited)
        elif dotted in SUGGESTIONS:
            self.widget = QComboBox()
            self.widget.setEditable(True)
            self.widget.addItems(SUGGESTIONS[dotted])
            self.widget.currentTextChanged.connect(self._edited)
        else:
            self.widget = QLineEdit()
            self.widget.textChanged.connect(self._edited)
        self.widget.setObjectName(dotted)
        self.widget.setToolTip(self.tip)
        self.error_label = QLabel()
        self.error_label.setWordWrap(True)
        self.error_label.setStyleSheet("color: #ff8a8f; font-size: 11px;")
        self.error_label.setVisible(False)
        self.error: str | None = None
        self.locked = False

    # -- value

    def raw(self) -> Any:
        w = self.widget
        if isinstance(w, QCheckBox):
            return w.isChecked()
        if isinstance(w, QComboBox):
            return w.currentText()
        return w.text()

    def set_raw(self, text: Any) -> None:
        w = self.widget
        if isinstance(w, QCheckBox):
            w.setChecked(bool(text))
        elif isinstance(w, QComboBox):
            if w.isEditable():
                w.setCurrentText(str(text))
            else:
                i = w.findText(str(text))
                w.setCurrentIndex(max(i, 0))
        else:
            w.setText(str(text))

    def set_value(self, value: Any) -> None:
        if self.dotted == QUANT:
            four, eight = value
            label = next((k for k, v in QUANT_CHOICES.items() if v == (bool(four), bool(eight))), "none")
            self.set_raw(label)
        elif isinstance(self.widget, QCheckBox):
            self.set_raw(bool(value))
        else:
            self.set_raw(fmt_value(value))
        self.check()

    def value(self) -> Any:
        """The validated value; raises ConfigError with the engine's message."""
        if self.dotted == QUANT:
            return QUANT_CHOICES.get(self.raw(), (False, False))
        return cfgmod.validate_value(self.section, self.key, self.raw())

    def check(self) -> str | None:
        try:
            self.value()
            err = None
        except ConfigError as e:
            err = e.one_line()
        self.show_error(err)
        return err

    def show_error(self, err: str | None) -> None:
        self.error = err
        self.error_label.setText(err or "")
        self.error_label.setVisible(bool(err))
        self._set_prop("invalid", bool(err))
        self.widget.setToolTip(
            self.tip if not err else f"{self.tip}<p style='color:#ff8a8f'>{html.escape(err)}</p>"
        )

    def _edited(self, *_args) -> None:
        self.check()
        self.changed.emit()

    # -- run state

    def set_locked(self, locked: bool, why: str = "") -> None:
        self.locked = locked
        self.widget.setEnabled(not locked)
        self.label.setEnabled(not locked)
        tip = self.tip if not locked else f"{self.tip}<p><b>{html.escape(why)}</b></p>"
        self.widget.setToolTip(tip)
        self.label.setToolTip(tip)

    def mark_changed(self, on: bool) -> None:
        self._set_prop("changed", on)

    def _set_prop(self, name: str, on: bool) -> None:
        w = self.widget
        target = w.lineEdit() if isinstance(w, QComboBox) and w.isEditable() else w
        if bool(target.property(name)) != on:
            target.setProperty(name, on)
            # A dynamic property feeds the style sheet only once the widget is repolished, and the
            # new look shows only once it is repainted (else the old border stays until a hover).
            target.style().unpolish(target)
            target.style().polish(target)
            target.update()


class HyperparamForm(QWidget):
    """All settings but the model and data paths, grouped; live keys stay editable during a run."""

    edited = Signal()
    apply_requested = Signal(dict)  # {key: new value} for the live keys the user changed

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.editors: dict[str, FieldEditor] = {}
        self.running = False
        self.baseline: dict[str, Any] = {}  # live values the run is using now
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)

        # Apply bar (visible during a run). Not in this form's layout: the setup panel pins it below
        # its scroll area, so it stays in view however far the form is scrolled.
        self.apply_bar = QWidget()
        ab = QVBoxLayout(self.apply_bar)
        ab.setSpacing(3)
        ab.setContentsMargins(0, 0, 0, 0)
        self.apply_hint = QLabel(RUNNING_HINT)
        self.apply_hint.setStyleSheet("color: #8a9099;")
        self.apply_hint.setWordWrap(True)
        self.apply_button = QPushButton("Apply")
        self.apply_button.setToolTip(
            "Send the changed live settings to the run; they take effect from the next "
            "optimizer step and show up as a marker on the plots."
        )
        self.apply_button.setEnabled(False)
        self.apply_button.clicked.connect(self._apply)
        self.revert_button = QPushButton("Revert")
        self.revert_button.setToolTip("Put back the values the run is using now.")
        self.revert_button.setEnabled(False)
        self.revert_button.clicked.connect(self.revert_live)
        self.keep_effective = QCheckBox("keep the effective batch")
        self.keep_effective.setChecked(True)
        self.keep_effective.setToolTip(
            "A new batch size changes the gradient accumulation with it, so batch size x accumulation "
            "(the examples per optimizer step) stays as the run has it: the same steps, the same updates, "
            "in smaller or larger pieces."
        )
        # the hint on a line of its own: beside the buttons a narrow panel wraps it word by word
        ab.addWidget(self.apply_hint)
        ab.addWidget(self.keep_effective)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.revert_button)
        buttons.addWidget(self.apply_button)
        ab.addLayout(buttons)
        self.apply_bar.setVisible(False)

        # How many processes run it: not a config key (the CLI's --nproc-per-node), so not an editor.
        self.processes = QSpinBox()
        self.processes.setObjectName("processes")
        self.processes.setRange(1, MAX_PROCESSES)
        self.processes_label = QLabel("processes")
        self.processes_error = QLabel()
        self.processes_error.setWordWrap(True)
        self.processes_error.setStyleSheet("color: #ff8a8f; font-size: 11px;")
        self.processes_error.setVisible(False)
        self.processes.valueChanged.connect(self._processes_changed)
        self.distributed_ok = distributed_available()

        placed: set[str] = set()
        for title, keys in GROUPS:
            box = self._group(title, keys)
            if title == "Processes":
                col = QWidget()
                v = QVBoxLayout(col)
                v.setContentsMargins(0, 0, 0, 0)
                v.setSpacing(1)
                v.addWidget(self.processes)
                v.addWidget(self.processes_error)
                form = box.layout()
                assert isinstance(form, QFormLayout)
                form.insertRow(0, self.processes_label, col)
            lay.addWidget(box)
            placed.update(keys)
        placed.update(EXTERNAL | {"model.load_in_4bit", "model.load_in_8bit"})
        rest = [
            f"{s}.{f.name}"
            for s, cls in SECTIONS.items()
            for f in dataclasses.fields(cls)
            if f"{s}.{f.name}" not in placed
        ]
        self.advanced_toggle = QToolButton()
        self.advanced_toggle.setText("Advanced settings")
        self.advanced_toggle.setCheckable(True)
        self.advanced_toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.advanced_toggle.setArrowType(Qt.ArrowType.RightArrow)
        self.advanced = self._group("Advanced", rest)
        self.advanced.setVisible(False)
        self.advanced_toggle.toggled.connect(self._toggle_advanced)
        lay.addWidget(self.advanced_toggle)
        lay.addWidget(self.advanced)
        lay.addStretch(1)
        self.editors["train.per_device_train_batch_size"].changed.connect(self._batch_edited)
        self.set_config(Config())
        self._sync_processes()

    def _group(self, title: str, keys: list[str]) -> QGroupBox:
        box = QGroupBox(title)
        form = QFormLayout(box)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.setVerticalSpacing(4)
        for dotted in keys:
            ed = FieldEditor(dotted)
            ed.changed.connect(self._edited)
            if ed.live:
                ed.widget.installEventFilter(self)
            self.editors[dotted] = ed
            col = QWidget()
            v = QVBoxLayout(col)
            v.setContentsMargins(0, 0, 0, 0)
            v.setSpacing(1)
            v.addWidget(ed.widget)
            v.addWidget(ed.error_label)
            form.addRow(ed.label, col)
        return box

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt name)
        # Enter in a live field applies, as a dialog's default button would.
        if (
            self.running
            and event.type() == QEvent.Type.KeyPress
            and isinstance(event, QKeyEvent)
            and event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter)
        ):
            popup = isinstance(obj, QComboBox) and obj.view().isVisible()
            if not popup:
                self._apply()
                return True
        return super().eventFilter(obj, event)

    # ------------------------------------------------------------------ processes

    def set_processes(self, n: int) -> None:
        self.processes.setValue(max(1, min(MAX_PROCESSES, int(n))))
        self._sync_processes()

    def show_processes_error(self, err: str | None) -> None:
        """A problem with running on this many processes (the engine's refusal), under the field."""
        self.processes_error.setText(err or "")
        self.processes_error.setVisible(bool(err))

    def _processes_changed(self, _n: int) -> None:
        self._sync_processes()
        self.edited.emit()

    def _sync_processes(self) -> None:
        """The field is locked during a run and where torch has no torch.distributed; train.distributed
        is dimmed while one process runs (it ignores it)."""
        usable = self.distributed_ok and not self.running
        if not self.distributed_ok:
            self.processes.setValue(1)
        self.processes.setEnabled(usable)
        self.processes_label.setEnabled(usable)
        tip = PROCESSES_TIP
        if not self.distributed_ok:
            tip += f"<p><b>{NO_DISTRIBUTED_TIP}</b></p>"
        elif self.running:
            tip += "<p><b>Locked while a run goes.</b></p>"
        self.processes.setToolTip(tip)
        self.processes_label.setToolTip(tip)
        ed = self.editors.get("train.distributed")
        if ed is not None and not self.running:
            ed.set_locked(self.processes.value() <= 1, ONE_PROCESS_TIP)

    def set_paused(self, paused: bool) -> None:
        self.apply_hint.setText(PAUSED_HINT if paused else RUNNING_HINT)

    def _toggle_advanced(self, on: bool) -> None:
        self.advanced.setVisible(on)
        self.advanced_toggle.setArrowType(Qt.ArrowType.DownArrow if on else Qt.ArrowType.RightArrow)

    # ------------------------------------------------------------------ values

    def set_config(self, cfg: Config) -> None:
        for dotted, ed in self.editors.items():
            ed.blockSignals(True)
            if dotted == QUANT:
                ed.set_value((cfg.model.load_in_4bit, cfg.model.load_in_8bit))
            else:
                s, k = dotted.split(".", 1)
                ed.set_value(getattr(cfg.section(s), k))
            ed.blockSignals(False)
        self._edited()

    def values(self) -> dict[str, dict[str, Any]]:
        """Nested {section: {key: raw value}} for every field that is valid on its own."""
        out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        for dotted, ed in self.editors.items():
            try:
                v = ed.value()
            except ConfigError:
                continue
            if dotted == QUANT:
                out["model"]["load_in_4bit"], out["model"]["load_in_8bit"] = v
            else:
                out[ed.section][ed.key] = v
        return out

    def errors(self) -> dict[str, str]:
        return {d: ed.error for d, ed in self.editors.items() if ed.error}

    def editor(self, dotted: str) -> FieldEditor:
        return self.editors[dotted]

    # ------------------------------------------------------------------ live editing

    def set_running(self, running: bool, cfg: Config | None = None) -> None:
        """Lock what cannot change during a run; remember the live values the run starts with."""
        self.running = running
        if running and cfg is not None:
            self.baseline = {k: getattr(cfg.train, k) for k in LIVE_KEYS}
        why = LOCKED_TIP.format(live=", ".join(LIVE_KEYS))
        for ed in self.editors.values():
            ed.set_locked(running and not ed.live, why)
            if not running:
                ed.mark_changed(False)
        self._sync_processes()
        self.advanced_toggle.setEnabled(True)
        self.apply_hint.setText(RUNNING_HINT)
        self.apply_bar.setVisible(running)
        self._edited()

    def live_changes(self) -> dict[str, Any]:
        """Live keys whose (valid) value differs from what the run uses."""
        out = {}
        for key in LIVE_KEYS:
            ed = self.editors.get(f"train.{key}")
            if ed is None or ed.error or key not in self.baseline:
                continue
            v = ed.value()
            if v != self.baseline[key]:
                out[key] = v
        return out

    def note_changes(self, changes: dict[str, list[Any]]) -> None:
        """A change event: the run now uses these values; show them unless the user is mid-edit."""
        for name, pair in changes.items():
            key = name.split(".")[-1]
            old, new = (
                (pair[0], pair[1]) if isinstance(pair, (list, tuple)) and len(pair) == 2 else (None, pair)
            )
            if key not in LIVE_KEYS:
                continue
            ed = self.editors.get(f"train.{key}")
            self.baseline[key] = new
            if ed is None:
                continue
            try:
                current = ed.value()
            except ConfigError:
                current = None
            if current == old or old is None:  # else the user is typing something else: leave it
                ed.blockSignals(True)
                ed.set_value(new)
                ed.blockSignals(False)
        self._edited()

    def revert_live(self) -> None:
        self.apply_hint.setText(RUNNING_HINT)
        for key, v in self.baseline.items():
            ed = self.editors.get(f"train.{key}")
            if ed is not None:
                ed.blockSignals(True)
                ed.set_value(v)
                ed.blockSignals(False)
        self._edited()

    def _batch_edited(self) -> None:
        """With "keep the effective batch": the accumulation that keeps the run's examples per step at
        the new batch size (the nearest whole one where none keeps it exactly; the hint says so)."""
        if not (self.running and self.keep_effective.isChecked()):
            return
        batch = self.editors["train.per_device_train_batch_size"]
        keys = ("per_device_train_batch_size", "gradient_accumulation_steps")
        if batch.error or not all(k in self.baseline for k in keys):
            return
        effective = self.baseline[keys[0]] * self.baseline[keys[1]]
        size = batch.value()
        accumulation = max(1, round(effective / size))
        acc_editor = self.editors["train.gradient_accumulation_steps"]
        acc_editor.blockSignals(True)
        acc_editor.set_value(accumulation)
        acc_editor.blockSignals(False)
        if size * accumulation != effective:
            self.apply_hint.setText(
                f"No whole accumulation keeps {effective} examples per step at batch {size}: "
                f"{size} x {accumulation} = {size * accumulation}."
            )
        else:
            self.apply_hint.setText(RUNNING_HINT)
        self._edited()

    def _apply(self) -> None:
        changes = self.live_changes()
        if changes and self.running:
            self.apply_requested.emit(changes)

    def _edited(self, *_args) -> None:
        if self.running:
            changes = self.live_changes()
            for key in LIVE_KEYS:
                ed = self.editors.get(f"train.{key}")
                if ed is not None:
                    ed.mark_changed(key in changes)
            bad = any(self.editors[f"train.{k}"].error for k in LIVE_KEYS if f"train.{k}" in self.editors)
            self.apply_button.setEnabled(bool(changes) and not bad)
            self.revert_button.setEnabled(bool(changes) or bad)
        else:
            self.apply_button.setEnabled(False)
            self.revert_button.setEnabled(False)
        self.edited.emit()
