"""The log's start lines say which fast paths a run uses."""

from __future__ import annotations

from tunedeck.engine.protocol import StartEvent
from tunedeck.gui.widgets.log import LogPanel


def test_the_start_lines_name_the_fast_paths_and_compiling(qtbot):
    log = LogPanel()
    qtbot.addWidget(log)
    log.add_event(
        StartEvent(
            run_id="r",
            total_steps=10,
            run_dir="/runs/r",
            model={
                "device": "cuda",
                "attention": "tunedeck_varlen (varlen_attn)",
                "optimizer": "adamw_torch_fused",
                "liger": True,
                "liger_rope": True,
                "compiled": "inductor",
            },
        )
    )
    lines = [e[2] for e in log.entries]
    assert (
        "tunedeck_varlen (varlen_attn) attention, adamw_torch_fused optimizer, Liger kernels with RoPE"
        in lines
    )
    assert "torch.compile (inductor): the first steps compile the model and are slow" in lines
    log.add_event(
        StartEvent(
            run_id="s",
            total_steps=10,
            run_dir="/runs/s",
            model={
                "device": "cpu",
                "attention": "sdpa",
                "optimizer": "adamw_torch",
                "liger": False,
                "compiled": None,
            },
        )
    )
    assert log.entries[-2][2] == "sdpa attention, adamw_torch optimizer"
    assert not any("torch.compile" in e[2] for e in log.entries[len(lines) :])
