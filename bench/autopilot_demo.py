"""The autopilot demo: a CPU run of the builtin demo with a loss spike injected through the control file
(learning rate 0.9 for one step), which the loss_spike rule rolls back; then its events, and
optionally a screenshot of the window showing the run (needs a display: run under xvfb-run).

python -m bench.autopilot_demo OUT_DIR
xvfb-run -a -s "-screen 0 1600x1000x24" python -m bench.autopilot_demo OUT_DIR --shot docs/autopilot-spike.png
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SETS = [
    "train.run_name=spike",
    "train.max_steps=150",
    "train.save_steps=10",
    "train.eval_steps=25",
    "train.lr_scheduler_type=constant",
    "train.warmup_ratio=0",
    "train.autopilot=[{rule: loss_spike}]",
]
SPIKE_AT = 70  # after this step: learning rate 0.9 for one step, then back to 3e-3


def train(out: Path) -> Path:
    """Run tunedeck-train with a control file, injecting the spike when the run reaches SPIKE_AT."""
    out.mkdir(parents=True, exist_ok=True)
    control = out / "ctl.jsonl"
    control.write_text("")
    cmd = [
        sys.executable,
        "-m",
        "tunedeck.engine.cli",
        "--output-dir",
        str(out / "runs"),
        "--control",
        str(control),
    ]
    for s in SETS:
        cmd += ["--set", s]
    print("$ tunedeck-train", " ".join(f"'{c}'" if " " in c or "[" in c else c for c in cmd[3:]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "runs" / "spike" / "metrics.jsonl"
    sent: list[str] = []
    while proc.poll() is None:
        events = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
        last = max((e["step"] for e in events if e["type"] == "step"), default=0)
        up = any(
            e["type"] == "change" and e["changes"].get("learning_rate", [0, 0])[1] == 0.9 for e in events
        )
        for line, due in (
            ({"cmd": "set", "learning_rate": 0.9}, last >= SPIKE_AT and not sent),
            ({"cmd": "set", "learning_rate": 3e-3}, up and len(sent) == 1),
        ):
            if due:
                with control.open("a") as f:
                    f.write(json.dumps(line) + "\n")
                sent.append(f"after step {last}: {json.dumps(line)} >> ctl.jsonl")
        time.sleep(0.05)
    for s in sent:
        print("sent", s)
    print(
        "".join(
            line
            for line in (proc.stdout.read() if proc.stdout else "").splitlines(True)
            if not line.startswith("step ")
        )
    )
    return metrics.parent


def events(run: Path) -> None:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        if r["type"] in ("change", "rollback") or (r["type"] == "step" and 68 <= r["step"] <= 76):
            r = {
                k: v
                for k, v in r.items()
                if k
                in (
                    "type",
                    "step",
                    "loss",
                    "learning_rate",
                    "changes",
                    "source",
                    "rule",
                    "reason",
                    "from_step",
                    "to_step",
                    "checkpoint",
                    "branch",
                )
            }
            print(json.dumps(r))


def shot(run: Path, png: Path, lo: float, hi: float) -> None:
    """The run's events through the window's own handler (as a live run feeds them), then the screen."""
    from PySide6.QtCore import QSettings, QTimer
    from PySide6.QtWidgets import QApplication

    app = QApplication([])
    from tunedeck.engine import config as cfgmod
    from tunedeck.engine.protocol import event_from_dict
    from tunedeck.gui.history import RunHistory
    from tunedeck.gui.main_window import MainWindow
    from tunedeck.gui.widgets import theme

    theme.apply(app)
    settings = QSettings(str(run.parent / "demo-window.ini"), QSettings.Format.IniFormat)
    win = MainWindow(settings=settings, restore=False)
    win.resize(1600, 1000)
    win.move(0, 0)
    win.show()
    evs = [event_from_dict(json.loads(x)) for x in (run / "metrics.jsonl").read_text().splitlines()]
    win.set_config(cfgmod.from_dict(next(e for e in evs if e.type == "start").config))
    win.history = RunHistory()
    win.plots.set_history(win.history)
    win._on_events([e for e in evs if e.type != "end"])
    win.autopilot_dock.raise_()
    win.plots.show_range(lo, hi)

    def grab() -> None:
        win.plots.refresh(force=True)
        app.processEvents()
        subprocess.run(["import", "-window", "root", "-crop", "1600x1000+0+0", str(png)], check=True)
        app.quit()

    QTimer.singleShot(2500, grab)
    app.exec()
    print("screenshot:", png)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--shot", type=Path, help="also take a screenshot of the window (needs a display)")
    p.add_argument("--range", type=float, nargs=2, default=(50, 100), metavar=("LO", "HI"))
    a = p.parse_args()
    run_dir = train(a.out)
    events(run_dir)
    if a.shot:
        shot(run_dir, a.shot, *a.range)
