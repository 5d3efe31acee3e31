"""Start refuses a local dataset file or model folder that does not exist, before any run begins;
builtin:demo, builtin:tiny and hub names stay the engine's to resolve."""

from __future__ import annotations

from pathlib import Path

import pytest
from PySide6.QtCore import QEvent
from PySide6.QtWidgets import QApplication

from tests.gui.fake_session import factory
from tunedeck.engine.errors import TunedeckError
from tunedeck.engine.protocol import Cancel, Stop
from tunedeck.gui.widgets.data_picker import DataPicker
from tunedeck.gui.widgets.model_picker import missing_folder
from tunedeck.gui.widgets.setup import SetupPanel

DATA_FIX = "(choose an existing file, a hub dataset owner/name, or builtin:demo)"
MODEL_FIX = "(choose an existing folder, a hub id like owner/name, or builtin:tiny)"


def data_refusal(path: Path) -> str:
    return f"dataset file {path} does not exist {DATA_FIX}"


def test_start_refuses_a_dataset_file_that_does_not_exist(make_window, make_config, qtbot, tmp_path):
    make = factory(steps=3, delay=0.001)
    win = make_window(factory=make)
    win.set_config(make_config("train.learning_rate=3e-4", "lora.r=8"))
    missing = tmp_path / "nope" / "train.jsonl"
    win.setup.data.set_value(str(missing))
    msg = data_refusal(missing)

    # shown where the form shows its errors, with Start off and its tooltip saying why
    assert win.setup.problem == msg
    assert win.setup.problem_label.isVisible() and win.setup.problem_label.text() == msg
    assert not win.controls.start_action.isEnabled()
    assert win.controls.start_action.toolTip() == f"Fix the settings first: {msg}"

    # pressing Start (the action, F5, or a direct call) starts nothing
    win.controls.start_action.trigger()
    assert win.start_run() is False
    assert make.made == []  # no session was ever created
    assert not win.bridge.active and win.bridge.session is None
    assert win.controls.state == "idle" and win.status.state == "idle"
    assert win.banner.message == "The settings need fixing before a run can start"
    assert win.log.entries[-1][2] == f"not started: {msg}"

    # nothing is lost: the window and every value stay as they were
    assert win.isVisible()
    assert win.setup.data.value() == str(missing)
    assert win.setup.form.editor("train.learning_rate").value() == 3e-4
    assert win.setup.form.editor("lora.r").value() == 8
    assert win.setup.data.path_edit.isEnabled()

    # builtin:demo starts, with the rest of the settings as they were
    win.setup.data.set_value("builtin:demo")
    assert win.setup.problem is None and not win.setup.problem_label.isVisible()
    assert win.controls.start_action.isEnabled()
    win.controls.start_action.trigger()
    assert len(make.made) == 1 and win.bridge.active
    cfg = make.made[0].config
    assert cfg.data.path == "builtin:demo" and cfg.train.learning_rate == 3e-4 and cfg.lora.r == 8
    assert not win.banner.isVisible()
    qtbot.waitUntil(lambda: not win.bridge.active, timeout=10_000)
    assert win.history.status == "completed" and len(win.history) == 3


def test_a_running_job_is_untouched_when_its_file_goes_missing(make_window, make_config, qtbot, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    make = factory(steps=100_000, delay=0.002)
    win = make_window(factory=make)
    win.set_config(make_config(f"data.path={data}"))
    assert win.start_run()
    qtbot.waitUntil(lambda: len(win.history) > 3, timeout=10_000)

    data.unlink()
    win.setup.form.editor("train.learning_rate").set_raw("2e-4")  # a live edit re-checks the form
    assert win.setup.problem == data_refusal(data)
    assert win.start_run() is False  # a second Start is still refused, and the first run goes on
    assert len(make.made) == 1 and win.bridge.active
    assert win.controls.stop_action.isEnabled() and win.setup.form.apply_button.isEnabled()
    assert not any(isinstance(c, (Stop, Cancel)) for c in make.made[0].sent)
    n = len(win.history)
    qtbot.waitUntil(lambda: len(win.history) > n + 3, timeout=10_000)
    win.stop_run()
    qtbot.waitUntil(lambda: not win.bridge.active, timeout=10_000)
    assert win.history.status == "stopped"


def test_coming_back_to_the_window_rechecks_the_file(make_window, qtbot, tmp_path):
    win = make_window(factory=factory(steps=3))
    later = tmp_path / "later.jsonl"
    win.setup.data.set_value(str(later))
    assert win.setup.problem == data_refusal(later) and not win.controls.start_action.isEnabled()
    later.write_text('{"prompt": "a", "completion": "b"}\n')  # made in a terminal, say
    win.activateWindow()
    qtbot.waitUntil(win.isActiveWindow, timeout=5_000)
    QApplication.sendEvent(win, QEvent(QEvent.Type.ActivationChange))
    assert win.setup.problem is None and win.controls.start_action.isEnabled()


def test_builtins_and_hub_names_are_left_to_the_engine(qtbot, tmp_path, monkeypatch):
    monkeypatch.setattr(DataPicker, "refresh_preview", lambda self: None)  # no hub download for a preview
    p = SetupPanel()
    qtbot.addWidget(p)
    for name in ("builtin:demo", "org/name", "HuggingFaceH4/ultrachat_200k"):
        p.data.set_value(name)
        assert p.data.check() is None and p.problem is None, name
    for name in ("builtin:tiny", "org/name", "Qwen/Qwen2.5-0.5B-Instruct", "gpt2"):
        p.model.set_value(name)
        assert p.model.check() is None and p.problem is None, name

    folder = tmp_path / "no-model"
    p.model.set_value(str(folder))
    assert p.problem == f"model folder {folder} does not exist {MODEL_FIX}"
    assert p.problem_label.text() == p.problem
    assert p.model.info.text().endswith(f"{p.problem}</span>")
    folder.mkdir()
    p.model.set_value("builtin:tiny")
    p.model.set_value(str(folder))  # exists now: the engine says whether it is a model folder
    assert p.model.check() is None


def test_both_missing_are_counted(qtbot, tmp_path):
    p = SetupPanel()
    qtbot.addWidget(p)
    p.model.set_value(str(tmp_path / "m"))
    p.data.set_value(str(tmp_path / "d.jsonl"))
    assert p.problem == f"model folder {tmp_path / 'm'} does not exist {MODEL_FIX}"
    assert p.problem_label.text() == f"2 settings need fixing: {p.problem}"


# The form and the engine share engine.paths; these check, name by name, that the form refuses
# exactly what the engine would fail on, in the same words.


def _engine_refusal(load, name: str) -> str | None:
    """What the engine says when it loads ``name`` and finds nothing there, or None."""
    try:
        load(name)
    except TunedeckError as e:
        return e.one_line() if "does not exist" in e.message else None
    return None


DATA_PATHS = [
    "builtin:demo",
    "org/name",
    "org/name.v2",
    "squad",
    "missing.jsonl",
    "sub/missing.jsonl",
    "a/b/c",
    "~/tunedeck-no-such-file.jsonl",
    "/tunedeck-no-such-dir/x.csv",
    "builtin:other",
]


@pytest.mark.parametrize("path", [*DATA_PATHS, "<file>", "<dir>"])
def test_the_form_refuses_what_the_engine_fails_on_datasets(path, qtbot, tmp_path, monkeypatch):
    import tunedeck.engine.data

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tunedeck.engine.data, "_load_hub", lambda name, split: [{"text": "from the hub"}])
    monkeypatch.setattr(DataPicker, "refresh_preview", lambda self: None)
    if path == "<file>":
        (tmp_path / "ok.jsonl").write_text('{"text": "x"}\n')
        path = "ok.jsonl"
    elif path == "<dir>":
        (tmp_path / "folder").mkdir()
        path = "folder"
    engine_says = _engine_refusal(tunedeck.engine.data.load_rows, path)
    picker = DataPicker()
    qtbot.addWidget(picker)
    picker.set_value(path)
    form = picker.check()
    assert form == engine_says
    if form:
        assert form == data_refusal(Path(path).expanduser().absolute())


MODEL_NAMES = [
    "org/name",
    "gpt2",
    "./no-model",
    "/tunedeck-no-such-dir/model",
    "a/b/c",
    "~/tunedeck-no-such-model",
    "../up/model",
]


@pytest.mark.parametrize("name", [*MODEL_NAMES, "<folder>", "<empty-folder>"])
def test_the_form_refuses_what_the_engine_fails_on_models(name, tmp_path, monkeypatch):
    import tunedeck.engine.model

    monkeypatch.chdir(tmp_path)
    if name == "<folder>":
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "config.json").write_text("{}")
        name = "./model"
    elif name == "<empty-folder>":
        (tmp_path / "empty").mkdir()
        name = "./empty"
    engine_says = _engine_refusal(tunedeck.engine.model.resolve_path, name)
    form = missing_folder(name)
    assert form == engine_says
    if form:
        assert form == f"model folder {Path(name).expanduser().absolute()} does not exist {MODEL_FIX}"
