"""The sample panel sends the prompt as typed, trailing newline included, and refuses a blank one."""

from __future__ import annotations

from tunedeck.gui.widgets.samples import SamplePanel


def test_the_prompt_is_sent_as_typed(qtbot):
    panel = SamplePanel()
    qtbot.addWidget(panel)
    sent = []
    panel.generate.connect(lambda prompt, opts: sent.append((prompt, opts.max_new_tokens)))
    panel.set_live(True)
    panel.prompt.setPlainText("Upper: cloud\n")  # the demo's prompts end with a newline
    panel.max_tokens.setValue(7)
    panel.button.click()
    assert sent == [("Upper: cloud\n", 7)]
    panel.prompt.setPlainText("  \n ")
    panel.button.click()
    assert len(sent) == 1 and panel.status.text() == "Type a prompt first."
