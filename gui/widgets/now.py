"""The "now" strip above the plots: the current values at a glance, without hovering."""

from __future__ import annotations

import math

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QHBoxLayout, QLabel, QSizePolicy, QWidget

from tunedeck.gui.history import RunHistory, fmt_duration, fmt_mb, fmt_number
from tunedeck.gui.widgets.theme import COLORS, MUTED

FIELDS = [
    ("step", None),
    ("loss", COLORS["loss"]),
    ("lr", COLORS["lr"]),
    ("grad", COLORS["grad_norm"]),
    ("tok/s", COLORS["tokens_per_s"]),
    ("mem", COLORS["mem_allocated"]),
    ("ETA", None),
]


class NowStrip(QWidget):
    """Step, smoothed loss, LR, grad norm, tokens/s, memory and ETA of the newest step."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(8, 2, 8, 2)
        # One label for all values: the strip never asks the window for room (on a narrow one its
        # end is cut), and no value is squeezed into its neighbour.
        self.label = QLabel()
        self.label.setTextFormat(Qt.TextFormat.RichText)
        self.label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        lay.addWidget(self.label)
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        self.values: dict[str, str] = {}
        self.clear()

    def _put(self, name: str, value: str) -> None:
        self.values[name] = value

    def _show(self) -> None:
        gap = "&nbsp;" * 4
        self.label.setText(
            gap.join(
                f"<span style='color:{MUTED}'>{name}</span>&nbsp;"
                f"<span style='color:{color or '#e6e6e6'}; font-weight:600'>{self.values[name]}</span>"
                for name, color in FIELDS
            )
        )

    def clear(self) -> None:
        for name, _ in FIELDS:
            self._put(name, "–")
        self._show()

    def text(self) -> str:
        return "  ".join(f"{k} {v}" for k, v in self.values.items())

    def update_from(self, h: RunHistory, smoothed: float | None, running: bool) -> None:
        ev = h.last_step
        if ev is None:
            self.clear()
            return
        total = h.total_steps
        self._put("step", f"{ev.step:,} / {total:,}" if total else f"{ev.step:,}")
        loss = smoothed if smoothed is not None and math.isfinite(smoothed) else ev.loss
        self._put("loss", fmt_number(float(loss)))
        self._put("lr", fmt_number(ev.learning_rate))
        self._put("grad", fmt_number(ev.grad_norm) if ev.grad_norm is not None else "–")
        self._put("tok/s", f"{ev.tokens_per_s:,.0f}" if running else "–")
        if h.on_gpu and "gpu_used" in h.nonzero and h.last_system is not None:
            mem = fmt_mb(h.last_system.gpu_mem_used_mb)
        else:
            mem = fmt_mb(ev.mem_allocated_mb) if ev.mem_allocated_mb else "–"
        self._put("mem", mem)
        self._put("ETA", fmt_duration(ev.eta_s) if running else "–")
        self._show()
