"""``tunedeck-train``: the engine headless, with a progress bar and live commands from a file.

Exit status: 0 when the run completed or was stopped (saved), 1 when it failed or was cancelled,
2 for bad usage or a bad config. Ctrl-C once stops and saves; twice cancels.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from tunedeck.engine import builtin
from tunedeck.engine import config as config_mod
from tunedeck.engine.errors import ConfigError, TunedeckError
from tunedeck.engine.protocol import (
    Cancel,
    ChangeEvent,
    CheckpointEvent,
    EndEvent,
    ErrorEvent,
    EvalEvent,
    Event,
    ProgressEvent,
    RollbackEvent,
    SampleEvent,
    StartEvent,
    StateEvent,
    StepEvent,
    Stop,
    WarningEvent,
)

DEMO_PRESET = builtin.DEMO_PRESET


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tunedeck-train", description="Fine-tune a language model headless.")
    p.add_argument("config", nargs="?", help="YAML config (default: the builtin demo)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set train.learning_rate=2e-4 (repeatable)",
    )
    p.add_argument("--output-dir", help="where run folders go (train.output_dir)")
    p.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint folder")
    p.add_argument(
        "--control", metavar="FILE", help="apply JSON-line commands appended to FILE while the run goes"
    )
    p.add_argument("--quiet", action="store_true", help="print only warnings, errors and the result")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> config_mod.Config:
    if args.resume:
        from tunedeck.engine import checkpoint

        if args.config:
            raise ConfigError(
                "give either a config or --resume, not both",
                "a resumed run uses the config stored in its checkpoint; change it with --set",
            )
        cfg, _ = checkpoint.read_state(Path(args.resume))
    else:
        cfg = config_mod.load(args.config or DEMO_PRESET)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    return config_mod.apply_overrides(cfg, overrides) if overrides else cfg


def preflight(cfg: config_mod.Config) -> None:
    """Refuse, before loading anything, what cannot run on this machine."""
    import torch

    from tunedeck.engine import model, optim

    optim.check_available(cfg.train.optim)
    model.quantization_config(cfg, torch.float32)
    model.resolve_dtype(cfg.model.dtype, model.pick_device())


class ControlFile:
    """Tails FILE for JSON lines (only what is appended after the start) and hands them to ``send``."""

    def __init__(self, path: Path, send: Any, say: Any) -> None:
        self.path, self.send, self.say = path, send, say
        self.path.touch(exist_ok=True)
        self.offset = self.path.stat().st_size
        self.buffer = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def poll(self) -> None:
        size = self.path.stat().st_size if self.path.exists() else 0
        if size < self.offset:  # truncated or replaced: read it from the top
            self.offset = 0
        if size == self.offset:
            return
        with open(self.path, encoding="utf-8") as f:
            f.seek(self.offset)
            self.buffer += f.read()
            self.offset = f.tell()
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                self.send(json.loads(line))
            except json.JSONDecodeError as e:
                self.say(f"control: ignored a line that is not JSON ({e.msg}): {line.strip()[:80]}")

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.poll()


class Printer:
    """Step lines, or a progress bar on a terminal, plus one line for every other event."""

    def __init__(self, quiet: bool, stream: TextIO) -> None:
        self.quiet = quiet
        self.stream = stream
        self.bar: Any = None
        self.prep: Any = None  # the bar of a preparation (tokenizing) on a terminal
        self.tty = stream.isatty() and not quiet

    def say(self, text: str) -> None:
        bar = self.bar or self.prep
        if bar is not None:
            bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def handle(self, e: Event) -> None:
        match e:
            case ErrorEvent() | WarningEvent():
                advice = f" ({e.advice})" if e.advice else ""
                self.say(f"{e.type}: {e.message}{advice}")
            case _ if self.quiet:
                return
            case StartEvent():
                self._start(e)
            case StepEvent():
                self._step(e)
            case ProgressEvent():
                self._progress(e)
            case ChangeEvent():
                text = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in e.changes.items())
                who = f"{e.source} {e.rule}" if e.rule else e.source
                why = f"; {e.reason}" if e.reason else ""
                self.say(f"change after step {e.step} ({who}): {text}{why}")
            case RollbackEvent():
                kept = f"; steps {e.to_step + 1}-{e.from_step} kept as branch {e.branch}" if e.branch else ""
                self.say(f"rollback from step {e.from_step} to {e.checkpoint} (step {e.to_step}){kept}")
            case EvalEvent():
                self.say(f"eval at step {e.step}: eval_loss {e.eval_loss:.4f} perplexity {e.perplexity:.2f}")
            case CheckpointEvent():
                self.say(f"checkpoint at step {e.step}: {e.path}")
            case SampleEvent():
                self.say(f"sample at step {e.step}: {e.prompt!r} -> {e.text!r}")
            case StateEvent(state="paused"):
                self.say("paused")

    def _start(self, e: StartEvent) -> None:
        m, d = e.model, e.data
        self.say(
            f"run {e.run_id}: {m.get('params_trainable', 0):,} of {m.get('params_total', 0):,} parameters "
            f"trainable, {m.get('dtype')} on {m.get('device')}; {d.get('train_examples')} train / "
            f"{d.get('eval_examples')} eval examples; {e.total_steps} steps -> {e.run_dir}"
        )
        if e.parent:
            self.say(f"resumed from {e.resumed_from} into a new run folder; its parent run: {e.parent}")
        for line in (e.fast_paths(), e.compile_note()):
            if line:
                self.say(line)
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=e.total_steps, initial=e.step, file=self.stream, unit="step", dynamic_ncols=True
            )

    def _step(self, e: StepEvent) -> None:
        if self.bar is not None:
            self.bar.total = e.total_steps
            self.bar.update(e.step - self.bar.n)
            self.bar.set_postfix(
                loss=f"{e.loss:.4f}", lr=f"{e.learning_rate:.2e}", tok_s=f"{e.tokens_per_s:,.0f}"
            )
            return
        gn = f"{e.grad_norm:.3f}" if e.grad_norm is not None else "-"
        self.say(
            f"step {e.step}/{e.total_steps} loss {e.loss:.4f} lr {e.learning_rate:.3e} grad_norm {gn} "
            f"accum {e.gradient_accumulation_steps} tok/s {e.tokens_per_s:,.0f} "
            f"step_time {e.step_time_s * 1000:.1f}ms"
        )

    def _progress(self, e: ProgressEvent) -> None:
        """A bar on a terminal; elsewhere one line when a preparation starts and one when it ends."""
        finished = e.total is not None and e.done >= e.total
        if self.tty and e.unit:
            from tqdm.auto import tqdm

            if self.prep is None:
                self.prep = tqdm(
                    total=e.total, desc=e.stage, unit=f" {e.unit}", file=self.stream, leave=False
                )
            self.prep.update(e.done - self.prep.n)
            if finished:
                self.prep.close()
                self.prep = None
        elif e.done == 0:
            of = f" {e.total:,} {e.unit}" if e.total is not None and e.unit else ""
            self.say(f"{e.stage}{of}...")
        elif finished and e.unit:
            self.say(f"{e.stage}: {e.done:,} {e.unit} done")

    def close(self) -> None:
        for bar in (self.prep, self.bar):
            if bar is not None:
                bar.close()
        self.bar = self.prep = None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = build_config(args)
        if args.resume:  # what cannot change on resume is refused here, before anything loads
            from tunedeck.engine import resume

            resume.prepare(args.resume, cfg)
        preflight(cfg)
    except TunedeckError as e:
        print(f"tunedeck-train: error: {e.one_line()}", file=sys.stderr)
        return 2
    from tunedeck.engine.session import TrainingSession

    printer = Printer(args.quiet, sys.stderr if sys.stderr.isatty() else sys.stdout)
    session = TrainingSession(cfg, resume_from=args.resume)
    interrupts = {"n": 0}

    def on_sigint(signum: int, frame: Any) -> None:
        interrupts["n"] += 1
        if interrupts["n"] == 1:
            printer.say("interrupt: stopping after this step and saving (Ctrl-C again to cancel)")
            session.send(Stop())
        else:
            session.send(Cancel())

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, on_sigint)
    control = ControlFile(Path(args.control), session.send, printer.say) if args.control else None
    session.start()
    if control:
        control.start()
    end: EndEvent | None = None
    config_error = False
    try:
        while end is None:
            for event in session.drain():
                printer.handle(event)
                config_error |= (
                    isinstance(event, ErrorEvent)
                    and event.kind == "config"
                    and end is None
                    and session.run_dir is None
                )
                if isinstance(event, EndEvent):
                    end = event
            if end is None:
                time.sleep(0.05)
    finally:
        if control:
            control.stop()
        printer.close()
        if previous is not None:  # in-process callers (tests, notebooks) get their handler back
            signal.signal(signal.SIGINT, previous)
    session.join()
    where = f" -> {end.output}" if end.output else ""
    print(
        f"{end.status} at step {end.step}{where}",
        file=sys.stderr if args.quiet else printer.stream,
        flush=True,
    )
    if end.status in ("completed", "stopped"):
        return 0
    return 2 if config_error else 1


if __name__ == "__main__":
    sys.exit(main())
