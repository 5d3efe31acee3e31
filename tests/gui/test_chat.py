"""Chatting with a model after its run: the trained model kept in memory, or a run's final/ loaded;
sampling options; generation in a worker thread that Stop can end."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from PySide6.QtCore import QTimer

from tests.gui.fake_session import factory
from tunedeck.engine.protocol import Sample, SamplingOptions
from tunedeck.gui.chat import Answer, Failed, KeptModel

PROMPT = "Upper: cloud\n"  # the demo data's layout, newline included


class SlowSampler:
    """Writes one token every 20 ms until told to stop (or max_new_tokens)."""

    def __init__(self) -> None:
        self.thread: str | None = None

    def generate(self, prompt, options, should_stop=None):
        self.thread = threading.current_thread().name
        out = []
        for i in range(options.max_new_tokens):
            if should_stop is not None and should_stop():
                break
            out.append(str(i % 10))
            time.sleep(0.02)
        return "".join(out)


def wait_for(kept: KeptModel, qtbot, kind) -> list:
    got: list = []
    qtbot.waitUntil(lambda: got.extend(kept.poll()) or any(isinstance(r, kind) for r in got), timeout=60_000)
    return got


def test_the_kept_model_generates_in_a_worker_and_stop_ends_it(qtbot):
    kept = KeptModel()
    kept.keep(SlowSampler(), "run r (kept in memory)")
    assert kept.generate("hi", SamplingOptions(max_new_tokens=4096))
    assert not kept.generate("again", SamplingOptions())  # one job at a time
    qtbot.wait(100)
    kept.stop()
    (answer,) = [r for r in wait_for(kept, qtbot, Answer) if isinstance(r, Answer)]
    assert 0 < len(answer.text) < 4096 and answer.prompt == "hi"
    assert kept.sampler.thread == "tunedeck-chat"  # not the GUI thread
    kept.release()
    assert kept.sampler is None and not kept.ready


def test_a_folder_that_cannot_load_says_why_in_one_line(tmp_path, qtbot):
    kept = KeptModel()
    assert kept.load(tmp_path / "nothing-here")
    (failed,) = [r for r in wait_for(kept, qtbot, Failed) if isinstance(r, Failed)]
    assert failed.message.startswith(f"could not load {tmp_path / 'nothing-here'}: ")
    assert "\n" not in failed.message and kept.sampler is None


def test_sample_commands_during_a_run_carry_the_sampling_options(make_window, make_config, qtbot):
    make = factory(steps=100_000, delay=0.01)
    win = make_window(factory=make)
    win.set_config(make_config())
    win.start_run()
    qtbot.waitUntil(lambda: win.samples.live, timeout=10_000)
    s = win.samples
    assert not s.top_p.isEnabled()  # greedy: the sampling knobs do nothing yet
    s.temperature.setValue(0.7)
    assert s.top_p.isEnabled() and s.top_k.isEnabled() and s.seed.isEnabled()
    s.top_p.setValue(0.9)
    s.top_k.setValue(40)
    s.seed.setValue(7)
    s.max_tokens.setValue(12)
    s.prompt.setPlainText(PROMPT)
    s.button.click()
    qtbot.waitUntil(lambda: bool(s.samples), timeout=10_000)
    sent = [c for c in make.made[0].sent if isinstance(c, Sample)]
    assert sent == [Sample(prompt=PROMPT, max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=40, seed=7)]
    assert sent[0].to_dict()["temperature"] == 0.7  # as a --control line would carry it


def test_after_a_run_the_panel_chats_with_the_kept_model_until_the_next_run(make_window, make_config, qtbot):
    make = factory(steps=5, delay=0.001)
    win = make_window(factory=make)
    win.set_config(make_config())
    kept = SlowSampler()
    make_session = make

    def with_sampler(config, resume_from=None):
        session = make_session(config, resume_from)
        session.sampler = lambda: kept  # what TrainingSession.sampler() hands over after the end
        return session

    win.bridge.factory = with_sampler
    win.start_run()
    qtbot.waitUntil(lambda: not win.bridge.active, timeout=10_000)
    s = win.samples
    assert s.kept.sampler is kept and s.button.isEnabled() and "as trained" in s.model_label.text()
    s.prompt.setPlainText(PROMPT)
    s.max_tokens.setValue(30)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(10)
    s.button.click()
    assert s.status.text() == "generating…" and not s.button.isEnabled()
    qtbot.waitUntil(lambda: bool(s.answers), timeout=10_000)
    timer.stop()
    assert len(ticks) >= 20  # the GUI thread kept running while it wrote (~0.6 s)
    assert s.answers[0].text == "012345678901234567890123456789"
    assert "012345678901234567890123456789" in s.output.toPlainText()
    # the next run lets it go first
    win.start_run()
    assert s.kept.sampler is None
    qtbot.waitUntil(lambda: not win.bridge.active, timeout=10_000)


@pytest.mark.slow
def test_chat_with_the_real_trained_model_and_with_its_final_folder(make_window, make_config, qtbot):
    """The real engine: after a short run the panel answers with the model in memory; a second
    window loads the run's final/ from disk and, greedy, writes exactly the same."""
    win = make_window()
    win.set_config(make_config("train.max_steps=4"))
    win.start_run()
    qtbot.waitUntil(lambda: not win.bridge.active, timeout=120_000)
    assert win.history.status == "completed"
    s = win.samples
    assert s.kept.sampler is not None and s.button.isEnabled()
    s.prompt.setPlainText(PROMPT)
    s.max_tokens.setValue(8)
    s.button.click()
    qtbot.waitUntil(lambda: bool(s.answers), timeout=60_000)
    in_memory = s.answers[0].text
    final = Path(win.history.run_dir) / "final"

    other = make_window()
    o = other.samples
    assert not o.button.isEnabled()  # no model yet
    assert o.load(final)
    qtbot.waitUntil(lambda: o.kept.ready, timeout=120_000)
    o._collect()
    assert o.model_label.text() == f"Model: {final.parent.name}/final (loaded from disk)"
    assert f"loaded {final.parent.name}/final (loaded from disk) to chat with" in other.log.text()
    o.prompt.setPlainText(PROMPT)
    o.max_tokens.setValue(8)
    o.button.click()
    qtbot.waitUntil(lambda: bool(o.answers), timeout=60_000)
    assert o.answers[0].text == in_memory
