"""Measure how the window copes: redraw cost with huge series, and training speed with the window open.

    python -m tunedeck.gui.perf_check plots [--points 1000000]
        GUI-thread time of one plot refresh (set the data of every curve and paint the window)
        when each series holds --points points, in three situations: the whole run in view while
        points keep arriving (the live case), zoomed into the last 1% while points keep arriving,
        and a hover read-out.

    python -m tunedeck.gui.perf_check steps [--steps 200] [--repeats N] [--set section.key=value ...]
        The demo run's optimizer steps per second, headless (`tunedeck-train --quiet` in a
        subprocess) and with the window open and plotting (started with the real window's Start
        button), on the same config, one after the other; both from the step events' elapsed_s.
        Also how late each step reaches the screen: from the engine's step event (its time) to
        the end of the first paint of the plots that shows it (median and 90th percentile).

Both print a small table; run them under `xvfb-run` to include real painting, or with
QT_QPA_PLATFORM=offscreen.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from tunedeck.engine import builtin


def _app():
    from PySide6.QtWidgets import QApplication

    from tunedeck.gui.widgets import theme

    app = QApplication.instance() or QApplication(sys.argv[:1])
    theme.apply(app)
    return app


def _fake_history(n: int):
    import numpy as np

    from tunedeck.gui.history import RunHistory

    h = RunHistory(run_id="perf")
    rng = np.random.default_rng(0)
    steps = np.arange(1, n + 1, dtype=np.float64)
    h.steps.extend(steps)
    h.series["loss"].extend(3 * np.exp(-steps / (n / 4)) + 0.3 + 0.1 * rng.standard_normal(n))
    h.series["lr"].extend(1e-4 * np.cos(np.linspace(0, np.pi / 2, n)))
    h.series["grad_norm"].extend(np.abs(rng.standard_normal(n)) + 0.5)
    h.series["tokens_per_s"].extend(5000 + 300 * rng.standard_normal(n))
    h.series["mem_allocated"].extend(np.full(n, 900.0) + rng.standard_normal(n))
    for name in ("epoch", "elapsed", "step_time", "accum", "mem_reserved", "mem_peak"):
        h.series[name].extend(np.ones(n))
    h.nonzero.update({"loss", "lr", "grad_norm", "tokens_per_s", "mem_allocated"})
    h.eval_steps.extend(steps[:: max(1, n // 200)])
    h.eval_loss.extend(h.series["loss"].view[:: max(1, n // 200)])
    h.version += 1
    return h


def bench_plots(points: int, rounds: int = 30, shot: str | None = None) -> dict[str, float]:
    import numpy as np
    from PySide6.QtWidgets import QApplication

    from tunedeck.gui.widgets.plots import PlotPanel

    app = _app()
    panel = PlotPanel()
    panel._timer.stop()  # we drive the refreshes ourselves
    panel.resize(1600, 1000)
    panel.show()
    hist = _fake_history(points)
    t0 = time.perf_counter()
    panel.set_history(hist)
    panel.glw.repaint()
    app.processEvents()
    first = time.perf_counter() - t0

    cpu: list[float] = []  # the GUI thread's own CPU time: what a busy, shared machine does not inflate

    def one(append: bool) -> float:
        if append:  # a new step arrived, as in a live run
            s = hist.steps.last() + 1
            hist.steps.append(s)
            for ser in hist.series.values():
                ser.append(ser.last())
            hist.version += 1
        t, c = time.perf_counter(), time.thread_time()
        panel.refresh()
        panel.glw.repaint()  # paint now, synchronously, on this thread
        QApplication.processEvents()
        cpu.append(time.thread_time() - c)
        return time.perf_counter() - t

    out = {"points per series": points, "first draw s": first}
    live = [one(True) for _ in range(rounds)]
    out["live refresh ms (median)"] = statistics.median(live) * 1e3
    out["live refresh ms (max)"] = max(live) * 1e3
    out["live refresh CPU ms (median)"] = statistics.median(cpu) * 1e3
    n = len(hist)
    panel.show_range(n * 0.99, n)
    app.processEvents()
    cpu.clear()
    zoom = [one(True) for _ in range(rounds)]
    out["zoomed refresh ms (median)"] = statistics.median(zoom) * 1e3
    out["zoomed refresh CPU ms (median)"] = statistics.median(cpu) * 1e3
    t = time.perf_counter()
    for s in np.linspace(n * 0.99, n, 20):
        panel.show_readout(float(s))
    out["hover read-out ms"] = (time.perf_counter() - t) / 20 * 1e3
    if shot:
        panel.grab().save(shot)
    panel.close()
    return out


def _rate(events) -> float:
    """Optimizer steps per second over the run, leaving out the first steps (warm-up)."""
    from tunedeck.engine.protocol import StepEvent

    st = [e for e in events if isinstance(e, StepEvent)]
    k = min(5, len(st) // 4)
    if len(st) - k < 2:
        return float("nan")
    return (st[-1].step - st[k].step) / (st[-1].elapsed_s - st[k].elapsed_s)


def _metrics(run_dir) -> list:
    import json

    from tunedeck.engine.protocol import event_from_dict

    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        return [event_from_dict(json.loads(line)) for line in fh if line.strip()]


def bench_steps(steps: int, overrides: list[str], repeats: int = 1) -> dict[str, float]:
    """Same config, one after the other: `tunedeck-train --quiet` in a subprocess, then the window."""
    import glob
    import subprocess
    import tempfile

    from tunedeck.engine import config as cfgmod

    _app()
    from PySide6.QtCore import QEventLoop, QSettings

    from tunedeck.gui.main_window import MainWindow

    preset = str(builtin.RESOURCES / "presets" / "demo.yaml")
    base = cfgmod.load(preset) if os.path.exists(preset) else cfgmod.Config()
    tmp = tempfile.mkdtemp(prefix="tunedeck-perf-")
    cfg = cfgmod.apply_overrides(
        base,
        [
            f"train.max_steps={steps}",
            "train.eval_steps=0",
            "train.save_steps=0",
            f"train.output_dir={tmp}",
            *overrides,
        ],
    )
    cfg_file = os.path.join(tmp, "config.yaml")
    cfgmod.save(cfg, cfg_file)
    out: dict[str, float] = {"steps": steps}
    headless, headless_spare, windowed = [], [], []
    latencies: list[float] = []
    # The window's session trains on all cores but one (its event loop keeps one); headless trains on
    # all. The second headless run takes the window's thread count, so the two ratios separate what
    # the window costs from what the core it keeps costs.
    spare = str(max(1, (os.cpu_count() or 1) - 1))

    def cli(folder: str, env: dict[str, str]) -> float:
        subprocess.run(
            [sys.executable, "-m", "tunedeck.engine.cli", cfg_file, "--quiet", "--output-dir", folder],
            check=True,
            stdout=subprocess.DEVNULL,
            env={**os.environ, **env},
        )
        return _rate(_metrics(glob.glob(os.path.join(folder, "*"))[0]))

    for r in range(repeats):
        # headless: the CLI, as a user runs it; then on the window's thread count
        headless.append(cli(os.path.join(tmp, f"cli-{r}"), {}))
        headless_spare.append(cli(os.path.join(tmp, f"cli-spare-{r}"), {"OMP_NUM_THREADS": spare}))
        # the window, plotting live (started with its Start button)
        settings = QSettings(os.path.join(tmp, "settings.ini"), QSettings.Format.IniFormat)
        win = MainWindow(settings=settings, restore=False)
        win.resize(1600, 1000)
        win.show()
        wcfg = cfg.copy()
        wcfg.train.output_dir = os.path.join(tmp, f"gui-{r}")
        win.set_config(wcfg)
        seen: list = []
        win.bridge.events.connect(seen.extend)
        redraws = win.plots.redraws
        win.plots.glw.paint_log = paints = []
        loop = QEventLoop()
        win.bridge.ended.connect(loop.quit)
        win.controls.start_action.trigger()
        if win.bridge.active:
            loop.exec()  # Qt's own loop, idle between events, as in the app
        windowed.append(_rate(seen))
        out[f"redraws (run {r + 1})"] = win.plots.redraws - redraws
        latencies += _latencies(seen, paints)
        win.close()
    out["headless runs"] = " ".join(f"{v:.2f}" for v in headless)
    out[f"headless runs on {spare} thread(s)"] = " ".join(f"{v:.2f}" for v in headless_spare)
    out["window runs"] = " ".join(f"{v:.2f}" for v in windowed)
    out["headless steps/s (tunedeck-train)"] = statistics.median(headless)
    out["window steps/s"] = statistics.median(windowed)
    out["window / headless"] = out["window steps/s"] / out["headless steps/s (tunedeck-train)"]
    out[f"window / headless on {spare} thread(s)"] = out["window steps/s"] / statistics.median(headless_spare)
    out["runs each (median shown)"] = repeats
    if latencies:
        lat = sorted(latencies)
        out["step to screen ms (median)"] = statistics.median(lat) * 1e3
        out["step to screen ms (90th pct)"] = lat[int(0.9 * (len(lat) - 1))] * 1e3
    return out


def _latencies(events, paints: list[tuple[int, float]]) -> list[float]:
    """For each step: from the engine's event (its time) to the end of the first paint that drew it."""
    from tunedeck.engine.protocol import StepEvent

    steps = [e for e in events if isinstance(e, StepEvent)]
    out, j = [], 0
    for i, e in enumerate(steps):
        while j < len(paints) and paints[j][0] < i + 1:
            j += 1
        if j == len(paints):
            break
        out.append(paints[j][1] - e.time)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tunedeck.gui.perf_check", description=__doc__.split("\n\n")[0]
    )
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("plots")
    p.add_argument("--points", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--grab", metavar="PNG", help="save a picture of the plots at the end")
    q = sub.add_parser("steps")
    q.add_argument("--steps", type=int, default=200)
    q.add_argument("--set", action="append", default=[], dest="overrides")
    q.add_argument(
        "--repeats", type=int, default=1, help="alternate headless and window runs this many times"
    )
    args = ap.parse_args(argv)
    res = (
        bench_plots(args.points, args.rounds, args.grab)
        if args.what == "plots"
        else bench_steps(args.steps, args.overrides, args.repeats)
    )
    from PySide6.QtGui import QGuiApplication

    print(
        f"Qt platform: {QGuiApplication.platformName()}, python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs"
    )
    for k, v in res.items():
        print(f"  {k:34s} {v:,.2f}" if isinstance(v, float) else f"  {k:34s} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
