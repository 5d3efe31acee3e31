"""The setup panel: a form generated from the config dataclasses, validated with the engine's words."""

from __future__ import annotations

import dataclasses

from tunedeck.engine import config as cfgmod
from tunedeck.engine.config import LIVE_KEYS, SECTIONS
from tunedeck.gui.widgets.hyperparams import QUANT, fmt_value
from tunedeck.gui.widgets.setup import SetupPanel


def panel(qtbot) -> SetupPanel:
    p = SetupPanel()
    qtbot.addWidget(p)
    p.show()
    return p


def test_every_config_field_has_an_editor_with_the_engine_help_as_tooltip(qtbot):
    p = panel(qtbot)
    eds = p.form.editors
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            dotted = f"{section}.{f.name}"
            if dotted in ("model.name_or_path", "data.path"):
                continue  # the pickers
            if dotted in ("model.load_in_4bit", "model.load_in_8bit"):
                dotted = QUANT
            assert dotted in eds, dotted
            help_text = cfgmod.field_help(section, f.name)
            assert (
                help_text.split(".")[0][:40].replace("'", "&#x27;") in eds[dotted].widget.toolTip()
                or help_text[:30] in eds[dotted].widget.toolTip()
            )
    assert "Can be changed while a run goes" in eds["train.learning_rate"].widget.toolTip()


def test_defaults_round_trip_to_the_same_config(qtbot):
    p = panel(qtbot)
    assert p.problem is None
    assert p.config().to_dict() == cfgmod.Config().to_dict()


def test_bad_values_are_flagged_with_the_engine_message(qtbot):
    p = panel(qtbot)
    seen = []
    p.validity_changed.connect(seen.append)
    lr = p.form.editor("train.learning_rate")
    lr.set_raw("2")
    try:
        cfgmod.validate_value("train", "learning_rate", "2")
    except cfgmod.ConfigError as e:
        expected = e.one_line()
    assert lr.error == expected and lr.error_label.isVisible()
    assert lr.widget.property("invalid")
    assert p.problem == expected and seen == [False]
    lr.set_raw("abc")
    assert "is not a number" in lr.error
    lr.set_raw("3e-4")
    assert lr.error is None and p.problem is None and seen[-1] is True and True not in seen[:-1]
    assert p.config().train.learning_rate == 3e-4


def test_rules_between_settings_come_from_the_engine(qtbot):
    p = panel(qtbot)
    p.form.editor(QUANT).set_raw("4-bit (QLoRA, NF4)")
    p.form.editor("lora.enabled").set_raw(False)
    assert p.problem and "quantized base model cannot be fully fine-tuned" in p.problem
    p.form.editor("lora.enabled").set_raw(True)
    assert p.problem is None and p.config().model.load_in_4bit


def test_live_keys_stay_editable_and_the_rest_locks_with_a_reason(qtbot):
    p = panel(qtbot)
    cfg = p.config()
    p.set_running(True, cfg)
    for dotted, ed in p.form.editors.items():
        live = dotted.startswith("train.") and dotted.split(".", 1)[1] in LIVE_KEYS
        assert ed.widget.isEnabled() == live, dotted
        if not live:
            assert "Locked while a run goes" in ed.widget.toolTip()
    assert not p.model.combo.isEnabled() and not p.data.path_edit.isEnabled()
    assert not p.form.processes.isEnabled() and "Locked while a run goes" in p.form.processes.toolTip()
    assert p.form.apply_bar.isVisible() and not p.form.apply_button.isEnabled()
    sent = []
    p.form.apply_requested.connect(sent.append)
    p.form.editor("train.learning_rate").set_raw("5e-4")
    p.form.editor("train.gradient_accumulation_steps").set_raw(
        str(cfg.train.gradient_accumulation_steps)
    )  # same
    assert p.form.apply_button.isEnabled()
    p.form.apply_button.click()
    assert sent == [{"learning_rate": 5e-4}]
    # the run confirms: the field is no longer "changed"
    p.form.note_changes({"learning_rate": [cfg.train.learning_rate, 5e-4]})
    assert not p.form.apply_button.isEnabled()
    # an automatic change updates the field
    p.form.note_changes({"max_grad_norm": [cfg.train.max_grad_norm, 0.5]})
    assert p.form.editor("train.max_grad_norm").value() == 0.5
    p.set_running(False)
    # train.distributed is dimmed while one process runs the whole model (it ignores it)
    assert p.form.processes.isEnabled() and p.processes() == 1
    assert all(ed.widget.isEnabled() for d, ed in p.form.editors.items() if d != "train.distributed")
    distributed = p.form.editor("train.distributed").widget
    assert not distributed.isEnabled() and "Used with processes above 1 only" in distributed.toolTip()
    p.form.processes.setValue(2)
    assert distributed.isEnabled()


def test_a_live_batch_size_keeps_the_effective_batch_unless_asked_not_to(qtbot):
    p = panel(qtbot)
    cfg = p.config()
    cfg.train.per_device_train_batch_size, cfg.train.gradient_accumulation_steps = 8, 2
    p.set_config(cfg)
    p.set_running(True, cfg)
    form = p.form
    batch, acc = (
        form.editor("train.per_device_train_batch_size"),
        form.editor("train.gradient_accumulation_steps"),
    )
    assert form.keep_effective.isChecked() and form.keep_effective.isVisibleTo(form)
    sent = []
    form.apply_requested.connect(sent.append)
    batch.set_raw("4")
    assert acc.value() == 4  # 8 x 2 = 4 x 4
    form.apply_button.click()
    assert sent == [{"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4}]
    form.note_changes({"per_device_train_batch_size": [8, 4], "gradient_accumulation_steps": [2, 4]})
    batch.set_raw("3")  # 16 examples per step: no whole accumulation at batch 3
    assert acc.value() == 5 and form.apply_hint.text() == (
        "No whole accumulation keeps 16 examples per step at batch 3: 3 x 5 = 15."
    )
    form.revert_live()
    assert (batch.value(), acc.value()) == (4, 4) and form.apply_hint.text().startswith("The run is going")
    form.keep_effective.setChecked(False)
    batch.set_raw("2")
    assert acc.value() == 4
    form.apply_button.click()
    assert sent[-1] == {"per_device_train_batch_size": 2}


def test_presets_load_and_save(qtbot, tmp_path):
    p = panel(qtbot)
    assert p.load_preset(cfgmod.Path(__file__).resolve().parents[2] / "resources" / "presets" / "demo.yaml")
    demo = p.config()
    p.form.editor("train.learning_rate").set_raw("1.5e-4")
    out = tmp_path / "mine.yaml"
    assert p.save_preset(out)
    loaded = cfgmod.load(out)
    assert loaded.train.learning_rate == 1.5e-4 and loaded.lora.r == demo.lora.r
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {learning_rate: -1}\n")
    messages = []
    p.message.connect(lambda lvl, text: messages.append((lvl, text)))
    assert not p.load_preset(bad)
    assert messages and messages[0][0] == "error" and "train.learning_rate" in messages[0][1]
    assert p.config().train.learning_rate == 1.5e-4  # unchanged


def test_dataset_preview_shows_rows_and_format(qtbot, tmp_path):
    p = panel(qtbot)
    qtbot.waitUntil(lambda: p.data.detected != "", timeout=10_000)
    assert p.data.table.rowCount() > 0 and p.data.total > 0
    f = tmp_path / "chat.jsonl"
    f.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n' * 3
    )
    p.data.set_value(str(f))
    qtbot.waitUntil(lambda: p.data.detected == "messages", timeout=10_000)
    assert p.data.total == 3 and "user: hi" in p.data.table.item(0, 0).text()
    p.data.set_value(str(tmp_path / "missing.jsonl"))
    qtbot.waitUntil(lambda: p.data.error is not None, timeout=10_000)
    assert "does not exist" in p.data.error
    assert p.problem == (
        f"dataset file {tmp_path / 'missing.jsonl'} does not exist "
        "(choose an existing file, a hub dataset owner/name, or builtin:demo)"
    )


def test_editor_text_reads_back_exactly():
    for v in (1e-4, 2.5e-5, 3e-3, 0.03, 1.0, 0.999, 1e-8, 123.456):
        assert float(fmt_value(v)) == v
    assert fmt_value(1e-4) == "1e-4" and fmt_value(["q_proj", "v_proj"]) == "q_proj, v_proj"
