"""Signals and stuck states: SIGTERM, SIGHUP and Ctrl-C stop and save; a second Ctrl-C cancels at
once, also while the engine is stuck; a non-finite loss ends a run nobody can resume.

The signal tests run the real ``tunedeck-train`` (``python -m tunedeck.engine.cli``), all at once to
share the interpreter start-up time."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.engine.helpers import CliRun, make_cfg
from tunedeck.engine import checkpoint, cli
from tunedeck.engine.protocol import Cancel, Sample
from tunedeck.engine.session import TrainingSession

FAST = ["--set", "data.max_length=64", "--set", "train.eval_steps=0", "--set", "lora.r=4"]
# The engine thread blocked in a C call while it loads the model: a read from a pipe nobody writes.
STUCK = (
    "import os, sys\n"
    "from tunedeck.engine import cli, model\n"
    "model.load = lambda *a, **k: os.read(os.pipe()[0], 1)\n"
    "sys.exit(cli.main())\n"
)


class Proc:
    """A tunedeck-train process whose output is read as it comes."""

    def __init__(self, args: list[str], script: str | None = None) -> None:
        cmd = [sys.executable, "-c", script] if script else [sys.executable, "-m", "tunedeck.engine.cli"]
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        self.p = subprocess.Popen(
            [*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.out: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                assert self.p.poll() is None, "\n".join(self.out)
                continue
            self.out.append(line)
            if text in line:
                return
        raise AssertionError(f"no {text!r} in:\n" + "\n".join(self.out))

    def finish(self, timeout: float = 120) -> int:
        code = self.p.wait(timeout)
        time.sleep(0.2)
        while not self.lines.empty():
            self.out.append(self.lines.get())
        return code

    @property
    def text(self) -> str:
        return "\n".join(self.out)


@pytest.fixture(scope="module")
def signalled(tmp_path_factory):
    """Four processes at once: SIGTERM, SIGHUP and SIGINT while training; Ctrl-C twice while stuck."""
    root = tmp_path_factory.mktemp("signals")
    procs = {}
    for name in ("SIGTERM", "SIGHUP", "SIGINT"):
        procs[name] = Proc(
            [
                "--output-dir",
                str(root),
                "--set",
                f"train.run_name={name}",
                "--set",
                "train.max_steps=100000",
                *FAST,
            ]
        )
    procs["stuck"] = Proc(["--output-dir", str(root / "stuck")], script=STUCK)
    for name in ("SIGTERM", "SIGHUP", "SIGINT"):
        procs[name].wait_for("step 2/")
        procs[name].p.send_signal(getattr(signal, name))
    stuck = procs["stuck"]
    stuck.wait_for("model...")
    stuck.p.send_signal(signal.SIGINT)
    stuck.wait_for("interrupt: stopping after this step and saving")
    stuck.p.send_signal(signal.SIGINT)
    second = time.monotonic()
    results = {"stuck": stuck.finish()}
    stuck.seconds = time.monotonic() - second  # type: ignore[attr-defined]
    results.update({name: p.finish() for name, p in procs.items() if name != "stuck"})
    return root, procs, results


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_stop_signal_stops_and_saves(signalled, name):
    root, procs, results = signalled
    p, run = procs[name], root / name
    assert results[name] == 0, p.text
    said = "interrupt" if name == "SIGINT" else name
    assert f"{said}: stopping after this step and saving (Ctrl-C again to cancel)" in p.text
    (last,) = [x for x in p.out if x.startswith("stopped at step ")]
    step = int(last.split()[3])
    assert last == f"stopped at step {step} -> {run / 'final'}"
    ckpt = run / "checkpoints" / checkpoint.step_dir_name(step)
    assert checkpoint.open_resume(ckpt).state["step"] == step
    assert (run / "final" / "adapter_model.safetensors").is_file()
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["type"] == "end" and events[-1]["status"] == "stopped" and events[-1]["step"] == step


@pytest.mark.slow
def test_a_second_ctrl_c_leaves_an_engine_stuck_in_loading(signalled):
    root, procs, results = signalled
    p = procs["stuck"]
    assert results["stuck"] == 1, p.text
    assert p.out[-2:] == [
        "cancelled: the engine is still busy with loading the model; leaving it "
        "(checkpoints already written are complete)",
        "cancelled at step 0",
    ]
    assert p.seconds < cli.CANCEL_GRACE_S + 5  # type: ignore[attr-defined]
    assert not (root / "stuck").exists()


def test_cancel_while_loading_ends_before_the_data_is_read(tmp_path, monkeypatch):
    from tunedeck.engine import data

    def never(*args, **kwargs):
        raise AssertionError("the data was read after a cancel")

    monkeypatch.setattr(data, "load_examples", never)
    s = TrainingSession(make_cfg(tmp_path), system_interval=0)
    s.start()
    s.send(Cancel())  # the model is still loading
    assert s.join(120)
    events = s.drain()
    assert [e.type for e in events if e.type in ("error", "end")] == ["end"]
    assert (events[-1].status, events[-1].step) == ("cancelled", 0)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_cancel_during_a_long_sample_ends_between_tokens(tmp_path):
    s = TrainingSession(make_cfg(tmp_path, train__max_steps=1000), system_interval=0)
    s.start()
    events: list = []
    deadline = time.monotonic() + 120
    while not any(e.type == "step" for e in events):
        assert time.monotonic() < deadline
        events += s.drain()
        time.sleep(0.02)
    s.send(Sample(prompt="Upper: a long one\n", max_new_tokens=1900))
    time.sleep(1.0)  # well into the generation: ~1900 tokens take far longer on this model
    sent = time.monotonic()
    s.send(Cancel())
    assert s.join(30)
    took = time.monotonic() - sent
    events += s.drain()
    assert events[-1].type == "end" and events[-1].status == "cancelled"
    assert took < 5, took


def _poison_from_step_3(monkeypatch):
    """The loss of every step from the third on is NaN (a forward hook), as a diverging run's is."""
    from tunedeck.engine.trainer import Trainer

    real = Trainer.setup

    def setup(self):
        real(self)
        trainer = self

        def hook(module, args, output):
            if trainer.step >= 2:
                output.loss = output.loss * float("nan")
            return output

        self.model.register_forward_hook(hook)

    monkeypatch.setattr(Trainer, "setup", setup)


def test_a_non_finite_loss_ends_a_headless_run_with_the_last_finite_weights_saved(
    tmp_path, capsys, monkeypatch
):
    _poison_from_step_3(monkeypatch)
    code = cli.main(
        ["--output-dir", str(tmp_path), "--set", "train.run_name=r", "--set", "train.max_steps=6", *FAST]
    )
    out = capsys.readouterr().out
    assert code == 1
    ckpt = tmp_path / "r" / "checkpoints" / "step-000002"
    assert (
        f"error: loss nan / grad norm nan at step 3 is not finite; the run ends, as nothing can resume it; "
        f"the last finite weights are in {ckpt} (resume from that checkpoint with a lower "
        "train.learning_rate or train.max_grad_norm; run with --control FILE to pause on a non-finite loss "
        "instead of ending)"
    ) in out
    assert out.rstrip().endswith("failed at step 2")
    assert checkpoint.open_resume(ckpt).state["step"] == 2
    events = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [e["state"] for e in events if e["type"] == "state"] == [
        "loading",
        "running",
        "stopping",
        "finished",
    ]
    assert (events[-1]["status"], events[-1]["step"], events[-1]["output"]) == ("failed", 2, None)


@pytest.mark.slow
def test_with_a_control_file_a_non_finite_loss_pauses(tmp_path, capsys, monkeypatch):
    _poison_from_step_3(monkeypatch)
    ctl = tmp_path / "ctl.jsonl"
    args = ["--output-dir", str(tmp_path), "--set", "train.run_name=r", "--set", "train.max_steps=6", *FAST]
    run = CliRun([*args, "--control", str(ctl)], tmp_path / "r")
    run.wait_for(lambda ev: any(e.get("state") == "paused" for e in ev))
    with open(ctl, "a") as f:
        f.write('{"cmd": "stop"}\n')
    assert run.join(120) == 0
    assert "warning: loss nan / grad norm nan at step 3 is not finite; paused before the optimizer step" in (
        capsys.readouterr().out
    )
    assert Path(tmp_path / "r" / "checkpoints" / "step-000002").is_dir()


def test_the_cli_exits_when_the_engine_thread_dies_without_an_end(tmp_path, capsys, monkeypatch):
    # As the window's bridge does: a thread gone without its end event is reported, never waited on.
    monkeypatch.setattr(TrainingSession, "_main", lambda self: None)
    code = cli.main(["--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1
    assert out.splitlines()[-2:] == [
        "error: the training thread ended without reporting why (this is a bug; see stderr)",
        "failed at step 0",
    ]
