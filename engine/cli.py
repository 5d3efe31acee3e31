"""``tunedeck-train``: the engine headless, with a progress bar and live commands from a file.

Exit status: 0 when the run completed or was stopped (saved), 1 when it failed or was cancelled,
2 for bad usage, a bad config or bad data. Ctrl-C once (or SIGTERM, SIGHUP) stops and saves; twice
cancels at once: when the engine does not end within ``CANCEL_GRACE_S`` (a model still loading, a
call into a library that does not return), the command leaves it and exits, saying what it left.

With ``--nproc-per-node N`` the same command runs again under torchrun (:mod:`tunedeck.engine.launch`).
Each process it starts (or that ``torchrun ... -m tunedeck.engine.cli`` starts) runs this ``main``
as one rank: rank 0 prints, reads commands and writes the run folder; the others print only their
errors, which also reach rank 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

from tunedeck.engine import builtin, control, launch, preflight
from tunedeck.engine import config as config_mod
from tunedeck.engine.errors import ConfigError, TunedeckError, keep_traceback
from tunedeck.engine.protocol import (
    Cancel,
    ChangeEvent,
    CheckpointEvent,
    EndEvent,
    ErrorEvent,
    EvalEvent,
    Event,
    FindLR,
    LrFindEvent,
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
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
CANCEL_GRACE_S = 3.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, with ``launch`` (torchrun's options, each None when not given) and ``argv`` (all
    the others, as a process under torchrun gets them)."""
    argv_given = argv
    argv = sys.argv[1:] if argv is None else list(argv)
    launch_args, rest = launch.parser().parse_known_args(argv)
    p = argparse.ArgumentParser(
        prog="tunedeck-train",
        description="Fine-tune a language model headless.",
        epilog=launch.epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    find = p.add_argument_group("learning-rate range test")
    find.add_argument(
        "--find-lr",
        action="store_true",
        help="instead of training, sweep the learning rate over a few steps, print the suggestion and "
        "write <run>/lr_find.json (with --resume: on the checkpoint's state)",
    )
    defaults = FindLR()
    find.add_argument(
        "--find-lr-start", type=float, default=defaults.start_lr, metavar="LR", help="%(default)g"
    )
    find.add_argument("--find-lr-end", type=float, default=defaults.end_lr, metavar="LR", help="%(default)g")
    find.add_argument("--find-lr-steps", type=int, default=defaults.steps, metavar="N", help="%(default)s")
    p.add_argument(
        "--on-nonfinite",
        choices=("pause", "stop"),
        help="on a non-finite loss: pause (to be resumed through a control file) or stop, failed, with "
        "the last finite weights saved (default: pause with --control, else stop)",
    )
    args = p.parse_args(rest)
    args.launch, args.argv = launch_args, rest
    args.own_process = argv_given is None  # this process's command line: it may end the process
    return args


def find_options(args: argparse.Namespace) -> FindLR | None:
    if not args.find_lr:
        return None
    return FindLR(start_lr=args.find_lr_start, end_lr=args.find_lr_end, steps=args.find_lr_steps).check()


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


class Printer:
    """Step lines, or a progress bar on a terminal, plus one line for every other event."""

    def __init__(self, quiet: bool, stream: TextIO, prefix: str = "") -> None:
        self.quiet = quiet
        self.stream = stream
        self.prefix = prefix  # "[rank 1] " in a process other than rank 0
        self.bar: Any = None
        self.prep: Any = None  # the bar of a preparation (tokenizing) on a terminal
        self.tty = stream.isatty() and not quiet

    def say(self, text: str) -> None:
        bar = self.bar or self.prep
        try:
            if bar is not None:
                bar.write(text, file=self.stream)
            else:
                print(self.prefix + text, file=self.stream, flush=True)
        except (OSError, ValueError):
            # The terminal is gone (a hang-up, a closed pipe): the run goes on and is saved.
            self.bar = self.prep = None
            self.stream = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process

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
            case LrFindEvent():
                self._lr_find(e)
            case StateEvent(state="paused"):
                self.say("paused")

    def _start(self, e: StartEvent) -> None:
        m, d = e.model, e.data
        n = m.get("threads") if m.get("device") == "cpu" else None
        threads = f" ({n} thread{'s' if n != 1 else ''})" if n else ""
        self.say(
            f"run {e.run_id}: {m.get('params_trainable', 0):,} of {m.get('params_total', 0):,} parameters "
            f"trainable, {m.get('dtype')} on {m.get('device')}{threads}; {d.get('train_examples')} train / "
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

    def _lr_find(self, e: LrFindEvent) -> None:
        """The curve in about ten rows, then the suggestions and how to use them."""
        self.say(f"lr_find at step {e.step}: {len(e.lrs)} steps, {e.stopped}")
        every = max(1, len(e.lrs) // 10)
        for i in sorted({*range(0, len(e.lrs), every), len(e.lrs) - 1} if e.lrs else set()):
            self.say(f"  lr {e.lrs[i]:.2e}  loss {e.losses[i]:.4f}  smoothed {e.smoothed[i]:.4f}")
        if e.suggestion is None:
            self.say("lr_find: no suggestion (the loss did not fall); widen the range or add steps")
        else:
            self.say(
                f"lr_find: suggested learning_rate {e.suggestion:.2e} (steepest descent of the smoothed "
                f"loss); minimum/10 rule: {e.lr_min_div_10:.2e}"
            )
            self.say(f"  use it: --set train.learning_rate={e.suggestion:.2e}")
        if e.smoothed and min(range(len(e.smoothed)), key=e.smoothed.__getitem__) == len(e.smoothed) - 1:
            self.say(
                "  the loss was still falling at the end of the range: a larger --find-lr-end shows more"
            )
        if e.path:
            self.say(f"  curve: {e.path}")

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
                with contextlib.suppress(OSError, ValueError):
                    bar.close()
        self.bar = self.prep = None


class Watch:
    """What the run is doing, from its events, to say what a cancel leaves behind."""

    def __init__(self) -> None:
        self.state = "loading"
        self.stage = "model"
        self.step = 0

    def see(self, e: Event) -> None:
        match e:
            case StateEvent():
                self.state = e.state
            case ProgressEvent():
                self.stage = e.stage
            case StepEvent():
                self.step = e.step

    def doing(self) -> str:
        if self.state == "loading":
            return "loading the model" if self.stage == "model" else f"preparing the run ({self.stage})"
        if self.state == "stopping":
            return "the final save (a checkpoint is renamed into place only once complete)"
        return f"step {self.step + 1} or a sample"


def main(argv: list[str] | None = None) -> int:
    """The command; ``argv`` None reads this process's command line (the installed command)."""
    args = parse_args(argv)
    try:
        return _main(args)
    except KeyboardInterrupt:  # before the run's own handlers: nothing to save
        print("tunedeck-train: interrupted before the run started; nothing to save", file=sys.stderr)
        return 1
    except Exception as e:  # a bug in this command itself: its traceback is kept, then one line
        where = keep_traceback(traceback.format_exc(), None)
        print(
            f"tunedeck-train: internal error: {type(e).__name__}: {e} (this is a bug; the traceback is {where})",
            file=sys.stderr,
        )
        return 1


def _main(args: argparse.Namespace) -> int:
    from tunedeck.engine import distributed

    torchrun = launch.requested(args.launch) and not distributed.under_launcher()
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone writes and reads
    try:
        if torchrun and (problem := launch.check(args.launch)):
            raise ConfigError(problem, "see tunedeck-train --help")
        cfg = build_config(args)
        if args.control and main_rank:
            control.check_path(Path(args.control))
        if args.resume:  # what cannot change on resume is refused here, before anything loads
            from tunedeck.engine import resume

            resume.prepare(args.resume, cfg)
        world = launch.world_size(args.launch) if torchrun else distributed.launched_world_size()
        preflight.check(cfg, args.resume, world_size=world, writes_run_folder=main_rank)
        args.find = find_options(args)
        if args.find is not None and world > 1:
            raise ConfigError(
                f"--find-lr runs on one process, not {world}: run it without --nproc-per-node (or "
                "torchrun), then train on several with the learning rate it suggests"
            )
    except TunedeckError as e:
        print(f"tunedeck-train: error: {e.one_line()}", file=sys.stderr)
        return 2
    if torchrun:
        return launch.run(launch.torchrun_command(args.launch, args.argv))
    try:
        dist = distributed.Dist.from_env(cfg.train.distributed)
    except TunedeckError as e:
        print(f"tunedeck-train: error: {e.one_line()}", file=sys.stderr)
        return 2
    except Exception as e:  # the others never came, or the rendezvous failed: torch says why
        print(
            f"tunedeck-train: error: could not join the other processes: {type(e).__name__}: {e}",
            file=sys.stderr,
        )
        return 1
    if not dist.enabled:
        return _run(args, cfg, None)
    code = _run(args, cfg, dist)
    if code != 0:
        # A failed run may leave collectives of the others waiting on this process: end it now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    dist.close()
    return code


def _run(args: argparse.Namespace, cfg: config_mod.Config, dist: Any) -> int:
    """One run in this process: the whole run, or one rank's part of it (``dist``)."""
    from tunedeck.engine.session import TrainingSession

    main_rank = dist is None or dist.is_main
    stream = sys.stderr if sys.stderr.isatty() or not main_rank else sys.stdout
    printer = Printer(args.quiet or not main_rank, stream, prefix="" if main_rank else f"[rank {dist.rank}] ")
    # Without a control file nobody can resume a paused run: a non-finite loss ends it instead.
    on_nonfinite = args.on_nonfinite or ("pause" if args.control else "stop")
    session = TrainingSession(
        cfg, resume_from=args.resume, dist=dist, on_nonfinite=on_nonfinite, find_lr_only=args.find
    )
    signals = Signals(session, printer, dist)
    ctl = (
        control.ControlFile(Path(args.control), session.send, session.report)
        if args.control and main_rank
        else None
    )
    session.start()
    if ctl:
        ctl.start()
    watch = Watch()
    end: EndEvent | None = None
    last_error: ErrorEvent | None = None
    usage_error = False
    try:
        while end is None:
            signals.act()
            for event in session.drain():
                printer.handle(event)
                watch.see(event)
                if isinstance(event, ErrorEvent):
                    last_error = event
                usage_error |= (
                    isinstance(event, ErrorEvent)
                    and event.kind in ("config", "data")
                    and end is None
                    and session.run_dir is None
                )
                if isinstance(event, StartEvent) and ctl and _same_file(ctl.path, event.run_dir):
                    ctl.stop()  # the session reads the run folder's control file itself
                if isinstance(event, EndEvent):
                    end = event
            if end is None and not session.alive:
                end = _lost(session, printer)
            elif end is None and signals.cancel_overdue():
                printer.say(
                    f"cancelled: the engine is still busy with {watch.doing()}; leaving it "
                    "(checkpoints already written are complete)"
                )
                signals.abandoned = True
                session.abandon(None, status="cancelled")
            if end is None:
                signals.check_deadline()
                time.sleep(0.05)
    finally:
        if ctl:
            ctl.stop()
        printer.close()
        signals.restore()
    session.join(timeout=1.0 if signals.abandoned else None)  # an abandoned thread may never end
    if not main_rank:
        if end.status == "failed" and last_error is not None:
            dist.report_failure(last_error.message, last_error.kind, last_error.advice)
        return 0 if end.status in ("completed", "stopped") else 1
    where = f" -> {end.output}" if end.output else ""
    with contextlib.suppress(OSError, ValueError):
        print(
            f"{end.status} at step {end.step}{where}",
            file=sys.stderr if args.quiet else printer.stream,
            flush=True,
        )
    code = 0 if end.status in ("completed", "stopped") else 2 if usage_error else 1
    if signals.abandoned and args.own_process and dist is None:
        # The engine is left in a call that does not return; the interpreter's teardown (seconds
        # with torch loaded) need not wait. Every file written is whole or a hidden temporary one.
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    return code


def _lost(session: Any, printer: Printer) -> EndEvent:
    """The engine thread ended without an end event (it never should): say so and end."""
    for event in session.drain():
        printer.handle(event)
        if isinstance(event, EndEvent):
            return event
    printer.say("error: the training thread ended without reporting why (this is a bug; see stderr)")
    return EndEvent(status="failed", step=0, output=None)


def _same_file(control: Path, run_dir: str) -> bool:
    from tunedeck.engine.control import CONTROL_FILE

    return bool(run_dir) and control.resolve() == (Path(run_dir) / CONTROL_FILE).resolve()


class Signals:
    """SIGINT, SIGTERM and SIGHUP: the first stops after the step and saves, the next cancels at once;
    a cancel the engine does not obey within ``CANCEL_GRACE_S`` leaves it (see :meth:`cancel_overdue`).

    The handler only notes the signal; :meth:`act`, called by the CLI's loop every few milliseconds,
    prints and sends the command: a handler that printed or took the session's locks could run inside
    the very write or lock it interrupted. On several processes rank 0 alone acts on signals (and tells
    the others at the next step boundary; they ignore them), and SIGTERM or SIGHUP (torchrun's way to
    end a job, or to end the others when one process died) stops and saves once; if the run has not
    ended ``grace_s`` later, a process it waits on is gone, and the run's record ends with an error.
    """

    def __init__(self, session: Any, printer: Printer, dist: Any) -> None:
        self.session, self.printer, self.dist = session, printer, dist
        self.count = 0
        self.cancel_at: float | None = None
        self.deadline: float | None = None
        self.abandoned = False
        # torchrun gives its processes this long after SIGTERM before SIGKILL; end the record first.
        self.grace_s = max(1.0, float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30")) - 5.0)
        self._noted: list[str] = []
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # in-process callers on other threads keep their own handling
        main_rank = dist is None or dist.is_main
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self.previous[sig] = signal.signal(sig, self._note if main_rank else signal.SIG_IGN)

    def _note(self, signum: int, frame: Any) -> None:
        self._noted.append(signal.Signals(signum).name)

    @staticmethod
    def _said(name: str) -> str:
        return "interrupt" if name == "SIGINT" else name

    def act(self) -> None:
        while self._noted:
            name = self._noted.pop(0)
            if self.dist is not None and name != "SIGINT":  # the launcher ends the job
                if self.deadline is None:
                    self.printer.say(f"{name}: stopping after this step and saving")
                    self.deadline = time.monotonic() + self.grace_s
                    self.session.send(Stop())
                continue
            self.count += 1
            if self.count == 1:
                self.printer.say(
                    f"{self._said(name)}: stopping after this step and saving (Ctrl-C again to cancel)"
                )
                self.session.send(Stop())
            else:
                self.printer.say(f"{self._said(name)}: cancelling")
                self.session.send(Cancel())
                if self.cancel_at is None:
                    self.cancel_at = time.monotonic()

    def cancel_overdue(self) -> bool:
        """A cancel was sent ``CANCEL_GRACE_S`` ago and the run has not ended: the engine is stuck."""
        return (
            not self.abandoned
            and self.cancel_at is not None
            and time.monotonic() - self.cancel_at > CANCEL_GRACE_S
        )

    def check_deadline(self) -> None:
        if self.deadline is None or self.abandoned or time.monotonic() < self.deadline:
            return
        self.abandoned = True
        failed = self.dist.failures() if self.dist is not None else {}
        if failed:
            r, e = min(failed.items())
            self.session.abandon(
                f"process {r} of {self.dist.world_size} failed: {e['message']}", e["kind"], e["advice"]
            )
        else:
            self.session.abandon(
                f"the run did not end within {self.grace_s:.0f} s of the launcher's stop signal: a process "
                "it waits on is gone or stuck",
                "internal",
                "torchrun's report names the process and how it ended; resume from the last checkpoint",
            )

    def restore(self) -> None:
        for sig, handler in self.previous.items():  # in-process callers get their handlers back
            signal.signal(sig, handler)
        self.previous.clear()


if __name__ == "__main__":
    sys.exit(main())
