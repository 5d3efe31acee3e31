"""Rollback's bookkeeping in the run folder: which checkpoint a name means, and the branches.

A rollback from step ``f`` to a checkpoint at step ``t`` leaves the steps ``t+1..f`` behind as a
branch. Nothing of it is overwritten: the checkpoints after ``t`` (and a ``final/`` after ``t``) move to
``<run>/branches/<n>/``, so ``checkpoints/`` always holds the trajectory the run is on and the
checkpoints written after the rollback take their usual names. ``branches/<n>/branch.json`` records
the branch (``from_step``, ``to_step``, ``checkpoint``, the folders moved); ``metrics.jsonl`` keeps the
branch's step events before the ``rollback`` event that ends them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tunedeck.engine import checkpoint
from tunedeck.engine.errors import ConfigError

BRANCHES = "branches"
BRANCH_FILE = "branch.json"


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps of the checkpoints in ``<run>/checkpoints/``, oldest first."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit():
            out.append(int(p.name[5:]))
    return sorted(out)


def resolve(run_dir: Path, name: str, step: int) -> Path:
    """The checkpoint folder ``name`` means in this run at ``step``: ``latest`` or ``step-000200``."""
    steps = [s for s in checkpoint_steps(run_dir) if s <= step]
    have = ", ".join(checkpoint.step_dir_name(s) for s in steps[-4:])
    if name == "latest":
        if not steps:
            raise ConfigError(
                "rollback: this run has no checkpoint yet", "send save first, or set save_steps"
            )
        return run_dir / "checkpoints" / checkpoint.step_dir_name(steps[-1])
    if "/" in name or "\\" in name:
        raise ConfigError(
            f"rollback: {name!r} is not a checkpoint of this run's trajectory",
            "give a name under checkpoints/ (step-000200) or latest; resume a branch's checkpoint as a "
            "new run with --resume",
        )
    folder = run_dir / "checkpoints" / name
    if not folder.is_dir():
        raise ConfigError(
            f"rollback: this run has no checkpoint {name}",
            f"checkpoints: {have or 'none yet'}" + (" or latest" if have else ""),
        )
    target = int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else -1
    if target > step:
        raise ConfigError(f"rollback: {name} is ahead of step {step}", f"checkpoints: {have} or latest")
    return folder


def open_branch(run_dir: Path, from_step: int, to_step: int, checkpoint_name: str) -> int | None:
    """Keep steps ``to_step+1..from_step`` as a new branch; its number, or None when none were left."""
    if from_step <= to_step:
        return None
    root = run_dir / BRANCHES
    root.mkdir(exist_ok=True)
    taken = [int(p.name) for p in root.iterdir() if p.name.isdigit()]
    n = max(taken, default=0) + 1
    branch = root / str(n)
    branch.mkdir()
    moved: list[str] = []
    later = [s for s in checkpoint_steps(run_dir) if s > to_step]
    if later:
        (branch / "checkpoints").mkdir()
    for s in later:
        name = checkpoint.step_dir_name(s)
        (run_dir / "checkpoints" / name).rename(branch / "checkpoints" / name)
        moved.append(f"checkpoints/{name}")
    final = run_dir / "final"
    if final.is_dir() and _step(final) > to_step:
        final.rename(branch / "final")
        moved.append("final")
    record = {
        "branch": n,
        "from_step": from_step,
        "to_step": to_step,
        "checkpoint": checkpoint_name,
        "moved": moved,
        "time": time.time(),
    }
    (branch / BRANCH_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return n


def branches(run_dir: Path) -> list[dict[str, object]]:
    """The branches recorded in a run folder, by number."""
    root = run_dir / BRANCHES
    if not root.is_dir():
        return []
    out = []
    for p in sorted((p for p in root.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        try:
            out.append(json.loads((p / BRANCH_FILE).read_text()))
        except (OSError, ValueError):
            continue
    return out


def _step(folder: Path) -> int:
    try:
        return int(json.loads((folder / checkpoint.STATE_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 10**12
