"""The sample panel: type a prompt, press Generate, read what the model writes.

During a run it asks the run (a ``sample`` command: the model as it is at this step). After the run
the trained model is kept in memory (until the next run) and the panel chats with it; a past run's
``final/`` or a checkpoint can be loaded too (Load…). Greedy by default; a temperature above 0
samples, with top-p, top-k and a seed. Loading and generating run in a worker thread
(:class:`tunedeck.gui.chat.KeptModel`), so the window stays responsive; Stop ends a long answer.
"""

from __future__ import annotations

import html
from pathlib import Path

from PySide6.QtCore import QTimer, Signal
from PySide6.QtWidgets import (
    QDoubleSpinBox,
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from tunedeck.engine.protocol import SampleEvent, SamplingOptions
from tunedeck.gui.chat import Answer, Failed, KeptModel, Loaded

MUTED = "#8a9099"
NO_MODEL = "No model: start a run, or Load… a run's final/ folder or a checkpoint to chat with it."


class SamplePanel(QWidget):
    generate = Signal(str, object)  # (prompt, SamplingOptions): a sample from the running run
    message = Signal(str, str)  # (level, text) for the log

    def __init__(self, parent: QWidget | None = None, kept: KeptModel | None = None) -> None:
        super().__init__(parent)
        self.kept = kept or KeptModel()
        self.model_label = QLabel(NO_MODEL)
        self.model_label.setWordWrap(True)
        self.model_label.setStyleSheet(f"color: {MUTED};")
        self.load_button = QPushButton("Load…")
        self.load_button.setToolTip(
            "Chat with a past run: choose its final/ folder or a checkpoints/step-N folder."
        )
        self.prompt = QPlainTextEdit()
        self.prompt.setPlaceholderText("Type a prompt, as a user of the fine-tuned model would…")
        self.prompt.setMaximumHeight(70)
        self.max_tokens = QSpinBox()
        self.max_tokens.setRange(1, 4096)
        self.max_tokens.setValue(64)
        self.max_tokens.setToolTip("max_new_tokens: the most tokens to generate")
        self.temperature = QDoubleSpinBox()
        self.temperature.setRange(0.0, 10.0)
        self.temperature.setSingleStep(0.1)
        self.temperature.setDecimals(2)
        self.temperature.setSpecialValueText("greedy")
        self.temperature.setToolTip(
            "temperature: 0 is greedy (the likeliest token each time); above 0 samples"
        )
        self.top_p = QDoubleSpinBox()
        self.top_p.setRange(0.01, 1.0)
        self.top_p.setSingleStep(0.05)
        self.top_p.setValue(1.0)
        self.top_p.setToolTip(
            "top_p: sample from the smallest set of tokens whose probability adds up to this"
        )
        self.top_k = QSpinBox()
        self.top_k.setRange(0, 1000)
        self.top_k.setSpecialValueText("off")
        self.top_k.setToolTip("top_k: sample from the k likeliest tokens (off: no cut)")
        self.seed = QSpinBox()
        self.seed.setRange(-1, 2**31 - 1)
        self.seed.setValue(-1)
        self.seed.setSpecialValueText("random")
        self.seed.setToolTip("seed: the same seed and settings give the same sample")
        for w in (self.top_p, self.top_k, self.seed):
            w.setEnabled(False)  # greedy: they do nothing
        self.button = QPushButton("Generate")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("End the answer after the current token.")
        self.stop_button.setVisible(False)
        self.status = QLabel("")
        self.status.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.status.setStyleSheet(f"color: {MUTED};")
        self.output = QTextBrowser()
        self.output.setOpenLinks(False)
        # small minimums: on a small screen the docks share little room with the plots
        self.prompt.setMinimumHeight(34)
        self.output.setMinimumHeight(36)

        top = QHBoxLayout()
        top.addWidget(self.model_label, 1)
        top.addWidget(self.load_button)
        # two pairs a row: the panel also fits a narrow column beside the plots
        opts = QGridLayout()
        opts.setHorizontalSpacing(6)
        opts.setVerticalSpacing(2)
        pairs = (
            ("tokens", self.max_tokens),
            ("temp", self.temperature),
            ("top-p", self.top_p),
            ("top-k", self.top_k),
            ("seed", self.seed),
        )
        for i, (text, w) in enumerate(pairs):
            lab = QLabel(text)
            lab.setStyleSheet(f"color: {MUTED};")
            lab.setToolTip(w.toolTip())
            row, col = divmod(i, 2)
            opts.addWidget(lab, row, 2 * col)
            opts.addWidget(w, row, 2 * col + 1)
        opts.setColumnStretch(4, 1)
        row = QHBoxLayout()
        row.addWidget(self.status, 1)
        row.addWidget(self.stop_button)
        row.addWidget(self.button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.setSpacing(3)
        lay.addLayout(top)
        lay.addWidget(self.prompt)
        lay.addLayout(opts)
        lay.addLayout(row)
        lay.addWidget(self.output, 1)

        self.samples: list[SampleEvent] = []
        self.answers: list[Answer] = []
        self.pending = 0
        self.live = False
        self.button.clicked.connect(self._clicked)
        self.stop_button.clicked.connect(self.kept.stop)
        self.load_button.clicked.connect(self.load_dialog)
        self.temperature.valueChanged.connect(self._temperature_changed)
        self._timer = QTimer(self)
        self._timer.setInterval(50)
        self._timer.timeout.connect(self._collect)
        self.start_dir = str(Path.home())
        self.set_live(False)

    # ------------------------------------------------------------------ options

    def options(self) -> SamplingOptions:
        seed = self.seed.value()
        return SamplingOptions(
            max_new_tokens=self.max_tokens.value(),
            temperature=round(self.temperature.value(), 4),
            top_p=round(self.top_p.value(), 4),
            top_k=self.top_k.value(),
            seed=None if seed < 0 else seed,
        )

    def _temperature_changed(self, t: float) -> None:
        for w in (self.top_p, self.top_k, self.seed):
            w.setEnabled(t > 0)

    # ------------------------------------------------------------------ which model

    def set_live(self, live: bool) -> None:
        """A run is going (or paused): samples come from it."""
        self.live = live
        if not live:
            self.pending = 0
        self._update()

    def keep_model(self, sampler, label: str) -> None:
        """The finished run's model, kept in memory for chatting until the next run."""
        self.kept.keep(sampler, label)
        self._update()

    def release_model(self) -> None:
        self.kept.release()
        self._update()

    def load(self, folder: str | Path) -> bool:
        if self.live or not self.kept.load(folder):
            return False
        self.status.setText(f"loading {folder}…")
        self._timer.start()
        self._update()
        return True

    def load_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(
            self, "A run's final/ folder or a checkpoint to chat with", self.start_dir
        )
        if folder:
            self.start_dir = str(Path(folder).parent)
            self.load(folder)

    def _update(self) -> None:
        busy = self.kept.busy
        if self.live:
            self.model_label.setText("Model: the run as it is now (training waits while it writes)")
        elif self.kept.sampler is not None:
            self.model_label.setText(f"Model: {html.escape(self.kept.label)}")
        elif not busy:
            self.model_label.setText(NO_MODEL)
        can = self.live or self.kept.ready
        self.button.setEnabled(can)
        self.load_button.setEnabled(not self.live and not busy)
        self.stop_button.setVisible(busy and self.kept.sampler is not None)
        self.button.setToolTip(
            "Generate with the model as it is at this step" if self.live else "Generate with the kept model"
        )
        if not can and not busy and not self.pending:
            self.status.setText("")

    # ------------------------------------------------------------------ generating

    def _clicked(self) -> None:
        # Sent as typed: a trailing newline is part of many training prompts ("Upper: cloud\n").
        text = self.prompt.toPlainText()
        if not text.strip():
            self.status.setText("Type a prompt first.")
            return
        opts = self.options()
        if self.live:
            self.pending += 1
            self.status.setText("generating at the next step boundary…")
            self.generate.emit(text, opts)
        elif self.kept.generate(text, opts):
            self.status.setText("generating…")
            self._timer.start()
            self._update()

    def _collect(self) -> None:
        for r in self.kept.poll():
            match r:
                case Answer():
                    self.answers.append(r)
                    self._show(r.prompt, r.text, self.kept.label.split(" (")[0])
                    self.status.setText("")
                case Loaded(label=label):
                    self.status.setText("")
                    self.message.emit("info", f"loaded {label} to chat with")
                case Failed(message=message):
                    self.status.setText(message)
                    self.message.emit("error", message)
        if not self.kept.busy:
            self._timer.stop()
        self._update()

    def command_refused(self) -> None:
        """An error came back: a sample asked for may never arrive; stop saying it is on its way."""
        if self.pending:
            self.pending = 0
            self.status.setText("the engine reported an error (see the log)")

    def add_sample(self, ev: SampleEvent) -> None:
        self.samples.append(ev)
        self.pending = max(0, self.pending - 1)
        self.status.setText("" if not self.pending else "generating…")
        self._show(ev.prompt, ev.text, f"step {ev.step}")

    def _show(self, prompt: str, text: str, where: str) -> None:
        body = (
            f"<span style='color:#e6e6e6; white-space:pre-wrap'>{html.escape(text)}</span>"
            if text.strip()
            else f"<span style='color:{MUTED}'><i>(no text: the model ended its answer at once)</i></span>"
        )
        self.output.append(
            f"<p><span style='color:{MUTED}'>{html.escape(where)}</span><br>"
            f"<span style='color:#8fd3ff; white-space:pre-wrap'>{html.escape(prompt)}</span><br>{body}</p>"
        )
