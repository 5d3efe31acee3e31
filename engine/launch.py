"""``tunedeck-train --nproc-per-node N``: the same command again under PyTorch's launcher, torchrun
(``python -m torch.distributed.run``), which starts the N processes, gives each its rank and watches them.

Only the launcher's own options are taken out of the command line; every other argument reaches each
process as given. One machine gets torchrun's ``--standalone`` rendezvous; several machines pass
``--nnodes`` with ``--rdzv-endpoint`` (and ``--rdzv-backend c10d``), or ``--node-rank`` with
``--master-addr``/``--master-port``, exactly as torchrun takes them.

Signals: torchrun starts each process in a session of its own, so a terminal's Ctrl-C reaches only this
command and torchrun. torchrun is told to ignore it (its own handling would SIGKILL the processes 30 s
later, mid-save if need be); this command passes each Ctrl-C to the processes, where rank 0 acts on it
as ``tunedeck-train`` does in one process (stop and save, then cancel) and tells the others at the next
step boundary. SIGTERM and SIGHUP go to torchrun, which passes them to every process; rank 0 then stops
and saves.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from typing import Any

# (option, metavar, help): torchrun's names, passed on to it as given.
OPTIONS = (
    ("--nproc-per-node", "N", "run on N processes of this machine through torchrun (one per GPU)"),
    ("--nnodes", "N", "machines in the job (torchrun's --nnodes, e.g. 2 or 1:4)"),
    ("--node-rank", "R", "this machine's rank (torchrun's static rendezvous)"),
    ("--rdzv-endpoint", "HOST:PORT", "where the machines meet (torchrun's --rdzv-endpoint)"),
    ("--rdzv-backend", "NAME", "torchrun's rendezvous backend (c10d with --rdzv-endpoint)"),
    ("--rdzv-id", "ID", "the job's id for the rendezvous"),
    ("--master-addr", "HOST", "rank 0's machine (torchrun's static rendezvous)"),
    ("--master-port", "PORT", "rank 0's port (torchrun's static rendezvous)"),
)
# torchrun passes these on to the processes; Ctrl-C is this command's to pass (see the module's docstring).
FORWARDED_SIGNALS = "SIGTERM,SIGHUP,SIGQUIT"


def parser() -> argparse.ArgumentParser:
    """The launcher's options alone, spelled in full (no abbreviations: what it does not take is
    passed to every process untouched)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for option, metavar, help_text in OPTIONS:
        p.add_argument(option, metavar=metavar, help=help_text)
    return p


def epilog() -> str:
    lines = ["several processes (through torchrun):"]
    lines += [f"  {option} {metavar}: {help_text}" for option, metavar, help_text in OPTIONS]
    return "\n".join(lines)


def requested(args: argparse.Namespace) -> bool:
    return any(getattr(args, _dest(o)) is not None for o, _, _ in OPTIONS)


def world_size(args: argparse.Namespace) -> int:
    """The processes the options ask for (the least, when ``--nnodes`` is a range)."""
    nodes = str(args.nnodes or "1").split(":")[0]
    per_node = int(args.nproc_per_node or 1)
    return per_node * int(nodes) if nodes.isdigit() else per_node


def check(args: argparse.Namespace) -> str | None:
    """One line saying what is wrong with the launcher options, or None."""
    if args.nproc_per_node is None:
        return "the torchrun options need --nproc-per-node N"
    if not str(args.nproc_per_node).isdigit() or int(args.nproc_per_node) < 1:
        return f"--nproc-per-node {args.nproc_per_node} is not a whole number >= 1"
    import torch

    n, gpus = int(args.nproc_per_node), torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and n > gpus:
        return f"--nproc-per-node {n} is more processes than this machine's {gpus} GPU(s) (one per GPU)"
    return None


def torchrun_command(args: argparse.Namespace, argv: list[str]) -> list[str]:
    """The torchrun command that runs ``argv`` (this command's other arguments) on the requested
    processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    several = any(
        getattr(args, _dest(o)) is not None
        for o in ("--nnodes", "--rdzv-endpoint", "--master-addr", "--node-rank")
    )
    if not several:
        cmd.append("--standalone")
    for option, _, _ in OPTIONS:
        value = getattr(args, _dest(option))
        if value is not None:
            cmd += [option, str(value)]
    if args.rdzv_endpoint is not None and args.rdzv_backend is None:
        cmd += ["--rdzv-backend", "c10d"]
    cmd += ["--signals-to-handle", FORWARDED_SIGNALS, "-m", "tunedeck.engine.cli", *argv]
    return cmd


def run(cmd: list[str]) -> int:
    """Run torchrun and return its exit status, passing on signals as the module's docstring says."""
    import psutil

    env = dict(os.environ)
    # One OpenMP thread per process unless chosen (torchrun's own default, said here without its banner).
    env.setdefault("OMP_NUM_THREADS", "1")
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # torchrun inherits it: it ignores Ctrl-C
    try:
        proc = subprocess.Popen(cmd, env=env)

        def forward(signum: int, frame: Any) -> None:
            proc.send_signal(signum)

        def interrupt(signum: int, frame: Any) -> None:
            try:
                workers = psutil.Process(proc.pid).children()
            except psutil.Error:
                return
            if not workers:  # still starting: torchrun ends the job
                proc.send_signal(signal.SIGTERM)
            for w in workers:
                with contextlib.suppress(psutil.Error):
                    w.send_signal(signal.SIGINT)

        signal.signal(signal.SIGINT, interrupt)
        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGHUP, forward)
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _dest(option: str) -> str:
    return option.lstrip("-").replace("-", "_")
