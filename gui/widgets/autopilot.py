"""The autopilot's rules of the run, each with a switch and its firings so far.

The rules come from the run's config (``train.autopilot``, in the start event); a switch sends
``{"cmd": "set", "autopilot": {name: on}}``, as a user could from a control file. Firings are the
``change`` events with source ``autopilot``.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QCheckBox, QLabel, QVBoxLayout, QWidget

from tunedeck.engine.protocol import ChangeEvent, Event, Set, StartEvent

EMPTY = "No autopilot rules in this run (train.autopilot in the settings)."


def _describe(rule: dict[str, Any]) -> str:
    skip = ("rule", "name", "enabled")
    return ", ".join(f"{k} {v}" for k, v in rule.items() if k not in skip)


class AutopilotPanel(QWidget):
    """One row per rule: a switch (live while the run goes), its settings, its firings and last reason."""

    command = Signal(object)  # a Set to send

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.rules: list[dict[str, Any]] = []
        self.firings: dict[str, list[ChangeEvent]] = {}
        self.switches: dict[str, QCheckBox] = {}
        self.details: dict[str, QLabel] = {}
        self.live = False
        self._lay = QVBoxLayout(self)
        self._lay.setContentsMargins(6, 4, 6, 4)
        self.empty = QLabel(EMPTY)
        self.empty.setWordWrap(True)
        self._lay.addWidget(self.empty)
        self._lay.addStretch(1)

    def add_event(self, ev: Event) -> None:
        match ev:
            case StartEvent(config=config):
                self.set_rules(list((config.get("train") or {}).get("autopilot") or []))
            case ChangeEvent(source="autopilot", rule=rule):
                self.firings.setdefault(rule, []).append(ev)
                self._update(rule)
            case ChangeEvent(changes={"autopilot": [_, rules]}):
                for rule in rules:
                    box = self.switches.get(rule["name"])
                    if box is not None:
                        box.blockSignals(True)
                        box.setChecked(bool(rule["enabled"]))
                        box.blockSignals(False)
            case _:
                pass

    def set_rules(self, rules: list[dict[str, Any]]) -> None:
        for w in (*self.switches.values(), *self.details.values()):
            self._lay.removeWidget(w)
            w.deleteLater()
        self.rules, self.firings, self.switches, self.details = rules, {}, {}, {}
        self.empty.setVisible(not rules)
        at = 0
        for rule in rules:
            name = rule["name"]
            box = QCheckBox(name if name == rule["rule"] else f"{name} ({rule['rule']})")
            box.setChecked(bool(rule.get("enabled", True)))
            box.setEnabled(self.live)
            box.toggled.connect(lambda on, n=name: self.command.emit(Set(values={"autopilot": {n: on}})))
            detail = QLabel()
            detail.setWordWrap(True)
            detail.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            self._lay.insertWidget(at, box)
            self._lay.insertWidget(at + 1, detail)
            at += 2
            self.switches[name], self.details[name] = box, detail
            self._update(name)

    def set_live(self, on: bool) -> None:
        self.live = on
        for box in self.switches.values():
            box.setEnabled(on)

    def _update(self, name: str) -> None:
        label = self.details.get(name)
        rule = next((r for r in self.rules if r["name"] == name), None)
        if label is None or rule is None:
            return
        fired = self.firings.get(name, [])
        limit = rule.get("max_firings", 1)
        text = f"{_describe(rule)}\nfired {len(fired)} of {limit}"
        if fired:
            text += f", last after step {fired[-1].step}: {fired[-1].reason}"
        label.setText(text)
