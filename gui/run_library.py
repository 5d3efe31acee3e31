"""The runs folder as a list of runs, and what one run came to. No Qt here.

Each run folder (``<runs>/<run>/metrics.jsonl`` + ``config.yaml``) is summed up in a
:class:`RunSummary`: name, date, status, steps, final loss, best eval loss, duration, tokens,
throughput, peak memory, model and dataset, the run it was resumed from (``parent.json``) and the
branches its rollbacks left behind (``branches/<n>/branch.json``). ``metrics.jsonl`` is read tolerantly
(see :meth:`RunHistory.load`: a half-written last line or an event type of a newer version is skipped),
and summaries are cached by the file's size and modification time, so listing a folder again after
one run has grown reads only that run. :func:`family` arranges a folder's runs as a tree: each run
under the run (and branch) it was resumed from.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tunedeck.engine import builtin
from tunedeck.gui.history import RunHistory

PARENT_FILE = "parent.json"  # engine/resume.py writes it in a run folder resumed from an older state
BRANCHES = "branches"  # engine/rollback.py keeps a rollback's abandoned checkpoints in branches/<n>/

METRICS = "metrics.jsonl"
# A run whose metrics.jsonl changed this recently, with no end event yet, is taken as going.
LIVE_WITHIN_S = 120.0


@dataclass(frozen=True)
class BranchSummary:
    """Steps ``to_step+1..from_step`` of a run, left behind by a rollback to ``checkpoint``."""

    number: int
    from_step: int
    to_step: int
    checkpoint: str
    time: float  # unix time of the rollback
    final_loss: float | None  # the last loss on the branch
    kept: tuple[str, ...]  # its checkpoints and final/, moved to branches/<number>/

    @property
    def steps(self) -> int:
        return self.from_step - self.to_step


@dataclass(frozen=True)
class Parent:
    """Where a run resumed into a new folder came from (its ``parent.json``)."""

    path: str  # the parent's run folder (or the checkpoint, when it lay in no run folder)
    branch: int | None  # the parent's branch the checkpoint lay in
    step: int | None
    checkpoint: str


@dataclass(frozen=True)
class RunSummary:
    path: str
    name: str
    started: float  # unix time (the folder's when the run never started)
    status: str  # completed | stopped | cancelled | failed | running | unfinished
    steps: int
    total_steps: int
    final_loss: float | None
    best_eval: tuple[int, float] | None  # (step, eval loss)
    duration_s: float | None
    tokens: int
    tokens_per_s: float | None
    peak_mem_mb: float | None
    on_gpu: bool
    model: str
    dataset: str
    output: str | None  # the final/ folder, when the run saved one
    lora: bool
    parent: Parent | None = None
    branches: tuple[BranchSummary, ...] = ()

    @property
    def date(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(self.started)) if self.started else ""


def summarize(hist: RunHistory, config: dict[str, Any] | None = None) -> RunSummary:
    """What ``hist`` came to; ``config`` (the run's config.yaml) fills in what its start event lacks."""
    cfg = hist.config or config or {}
    losses = hist.series["loss"].view
    finite = losses[np.isfinite(losses)]
    elapsed = hist.series["elapsed"].view
    tokens = int(np.nansum(hist.series["tokens"].view)) if len(hist) else 0
    duration: float | None = None
    if hist.started and hist.ended:
        duration = hist.ended - hist.started
    elif len(elapsed):
        duration = float(elapsed[-1])
    train_s = float(elapsed[-1]) if len(elapsed) and elapsed[-1] > 0 else None
    peaks = hist.series["mem_peak"].view
    peak = float(np.nanmax(peaks)) if len(peaks) and np.isfinite(peaks).any() and peaks.any() else None
    status = hist.status
    if not status:
        metrics = Path(hist.run_dir) / METRICS if hist.run_dir else None
        recent = (
            metrics is not None
            and metrics.is_file()
            and time.time() - metrics.stat().st_mtime < LIVE_WITHIN_S
        )
        status = "running" if recent else "unfinished"
    started = hist.started
    if not started and hist.run_dir and Path(hist.run_dir).exists():
        started = Path(hist.run_dir).stat().st_mtime
    model_cfg, data_cfg, lora_cfg = (cfg.get(k) or {} for k in ("model", "data", "lora"))
    output = hist.output
    if output is None and hist.run_dir and (Path(hist.run_dir) / "final").is_dir():
        output = str(Path(hist.run_dir) / "final")
    return RunSummary(
        path=hist.run_dir,
        name=hist.label(),
        started=started,
        status=status,
        steps=int(hist.steps.last(0.0)) if len(hist) else 0,
        total_steps=hist.total_steps,
        final_loss=float(finite[-1]) if len(finite) else None,
        best_eval=hist.best_eval(),
        duration_s=duration,
        tokens=tokens,
        tokens_per_s=tokens / train_s if train_s and tokens else None,
        peak_mem_mb=peak,
        on_gpu=hist.on_gpu,
        model=str(model_cfg.get("name_or_path", "")),
        dataset=str(data_cfg.get("path", "")),
        output=output,
        lora=bool(lora_cfg.get("enabled", True)),
        parent=read_parent(hist.run_dir) if hist.run_dir else None,
        branches=_branches(hist),
    )


def read_parent(run_dir: str | Path) -> Parent | None:
    """The run this one was resumed from (None when it was not, or its ``parent.json`` is unreadable)."""
    try:
        rec = json.loads((Path(run_dir) / PARENT_FILE).read_text(encoding="utf-8"))
        branch = rec.get("branch")
        return Parent(
            path=str(rec["parent"]),
            branch=int(branch) if branch not in (None, "") else None,
            step=int(rec["step"]) if rec.get("step") is not None else None,
            checkpoint=str(rec.get("checkpoint") or ""),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _branches(hist: RunHistory) -> tuple[BranchSummary, ...]:
    """The run's branches: as its folder records them (``branches/<n>/branch.json``), with the losses
    its metrics kept; a branch only the metrics know of (its record lost) is listed too."""
    records: dict[int, dict[str, Any]] = {}
    root = Path(hist.run_dir) / BRANCHES if hist.run_dir else None
    if root is not None and root.is_dir():
        for p in root.iterdir():
            if p.name.isdigit():
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    rec = json.loads((p / "branch.json").read_text(encoding="utf-8"))
                    records[int(p.name)] = rec if isinstance(rec, dict) else {}
    losses: dict[int, float | None] = {}
    for b in hist.branches:
        if b.number is None:
            continue
        finite = b.loss[np.isfinite(b.loss)]
        losses[b.number] = float(finite[-1]) if len(finite) > 1 else None  # [0] is the fork point
        if b.number not in records:
            records[b.number] = {"from_step": b.from_step, "to_step": b.to_step, "checkpoint": b.checkpoint}
    out = []
    for n in sorted(records):
        rec = records[n]
        with contextlib.suppress(KeyError, ValueError, TypeError):
            out.append(
                BranchSummary(
                    number=n,
                    from_step=int(rec["from_step"]),
                    to_step=int(rec["to_step"]),
                    checkpoint=str(rec.get("checkpoint", "")),
                    time=float(rec.get("time") or 0.0),
                    final_loss=losses.get(n),
                    kept=tuple(str(m) for m in rec.get("moved") or ()),
                )
            )
    return tuple(out)


def family(summaries: list[RunSummary]) -> dict[str | None, list[tuple[int | None, RunSummary]]]:
    """The runs as a tree: ``{parent run folder: [(branch, run), ...]}`` for each run resumed from a run
    in the list (``branch``: the parent's branch it came from, or None), and ``{None: [...]}`` for the
    rest (runs started afresh, or whose parent lies elsewhere), each list in the order given."""
    by_path = {_key(s.path): s.path for s in summaries}
    out: dict[str | None, list[tuple[int | None, RunSummary]]] = {None: []}
    for s in summaries:
        parent = by_path.get(_key(s.parent.path)) if s.parent is not None else None
        if parent is None or _key(parent) == _key(s.path):
            out[None].append((None, s))
        else:
            out.setdefault(parent, []).append((s.parent.branch if s.parent else None, s))
    return out


def _key(path: str) -> str:
    try:
        return str(Path(path).resolve())
    except OSError:
        return path


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's config.yaml as a dict ({} when missing or unreadable)."""
    try:
        data = yaml.safe_load((Path(run_dir) / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


_cache: dict[str, tuple[tuple[int, int], RunSummary]] = {}


def read_run(path: str | Path) -> RunSummary:
    """The summary of one run folder (cached until its metrics.jsonl changes)."""
    p = Path(path)
    metrics = p / METRICS
    st = metrics.stat()
    key = (st.st_size, st.st_mtime_ns)
    hit = _cache.get(str(p))
    if hit is not None and hit[0] == key and hit[1].status != "running":
        return hit[1]
    summary = summarize(RunHistory.load(p), read_config(p))
    _cache[str(p)] = (key, summary)
    return summary


def is_run(path: str | Path) -> bool:
    return (Path(path) / METRICS).is_file()


def is_runs_folder(path: str | Path) -> bool:
    """A folder that holds run folders (the runs folder itself), rather than being one."""
    p = Path(path)
    if not p.is_dir() or is_run(p):
        return False
    try:
        return any(is_run(c) for c in p.iterdir() if c.is_dir())
    except OSError:
        return False


def list_runs(folder: str | Path) -> list[RunSummary]:
    """Every run in ``folder``, newest first. Folders that are not runs are left out; a run whose
    files cannot be read is listed with what could be read."""
    p = Path(folder)
    try:
        children = [c for c in p.iterdir() if c.is_dir() and is_run(c)]
    except OSError:
        return []
    out = []
    for c in children:
        try:
            out.append(read_run(c))
        except OSError:
            continue
    return sorted(out, key=lambda s: s.started, reverse=True)


NAME_OK = re.compile(r"[^/\\\0]+")


def rename_run(path: str | Path, new_name: str) -> Path:
    """Rename a run folder in place; returns the new path. Raises ValueError with a one-line reason."""
    p = Path(path)
    new_name = new_name.strip()
    if not new_name or not NAME_OK.fullmatch(new_name) or new_name in (".", ".."):
        raise ValueError(f"{new_name!r} cannot name a folder: use letters, digits, - or _, no slash")
    target = p.parent / new_name
    if target.exists():
        raise ValueError(f"{target} already exists: choose another name")
    if not is_run(p):
        raise ValueError(f"{p} is not a run folder (it has no {METRICS})")
    p.rename(target)
    _cache.pop(str(p), None)
    return target


def delete_run(path: str | Path) -> None:
    """Delete a run folder and everything in it (only a folder that is a run)."""
    p = Path(path)
    if not is_run(p):
        raise ValueError(f"{p} is not a run folder (it has no {METRICS}): not deleted")
    shutil.rmtree(p)
    _cache.pop(str(p), None)


def folder_size(path: str | Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, f))
    return total


def peft_snippet(summary: RunSummary, config: dict[str, Any] | None = None) -> str:
    """Python that loads the run's final/ with transformers and peft."""
    out = summary.output or os.path.join(summary.path, "final")
    base = summary.model
    if base == builtin.TINY:
        # builtin:tiny is a real model folder in the cache; transformers loads it by path
        base = str(builtin.cache_dir() / f"builtin-tiny-{builtin.TINY_VERSION}")
    model_cfg = (config or {}).get("model") or {}
    quant = ""
    if model_cfg.get("load_in_4bit"):
        quant = ',\n    quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")'
    elif model_cfg.get("load_in_8bit"):
        quant = ",\n    quantization_config=BitsAndBytesConfig(load_in_8bit=True)"
    imports = "from transformers import AutoModelForCausalLM, AutoTokenizer" + (
        ", BitsAndBytesConfig" if quant else ""
    )
    if not summary.lora:
        return (
            f"{imports}\n\n"
            f"model = AutoModelForCausalLM.from_pretrained({out!r})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({out!r})\n"
        )
    return (
        "from peft import PeftModel\n"
        f"{imports}\n\n"
        f"base = AutoModelForCausalLM.from_pretrained(\n    {base!r}{quant}\n)\n"
        f"model = PeftModel.from_pretrained(base, {out!r})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({out!r})\n"
    )


def resolve_output_dir(output_dir: str, runs_folder: str | Path) -> str:
    """Where a run started from the window goes: an absolute ``train.output_dir`` as given; the
    default ``runs`` (relative, which the CLI takes from the current folder) is the window's runs
    folder; another relative path lies inside it."""
    p = Path(output_dir).expanduser()
    if p.is_absolute():
        return str(p)
    if p.parts in ((), ("runs",), (".",)):
        return str(Path(runs_folder))
    return str(Path(runs_folder) / p)
