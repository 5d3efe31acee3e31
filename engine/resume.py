"""What a resumed run may change, and which run folder it continues in.

A checkpoint holds the config its run had when it was written, live changes included. A resume with a
config of its own (``--resume CKPT --set ...``, or the window's settings), and a rollback with new
values, compare the config asked for with the checkpoint's, key by key:

- live values (``LIVE_KEYS`` and ``autopilot``) are applied at the resume step, as a ``change`` with
  source ``resume`` (a rollback's with its own source), exactly as if sent with ``set`` at that step;
- settings of how the run computes and reports, which leave its data, model and updates alone
  (``SETUP_KEYS``), are taken and recorded in that change;
- where the run is written (``output_dir``, ``run_name``): another place starts a new run folder;
- anything else would change the data order, the model or the run's length: refused, all in one line.

A run continues in its own folder only from its newest state. A checkpoint older than the run's newest
checkpoint or ``final/``, or one in a branch, starts a new run folder whose ``parent.json`` (and start
event) names the run it came from; nothing of the parent is overwritten.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tunedeck.engine import autopilot, checkpoint
from tunedeck.engine import config as config_mod
from tunedeck.engine.config import Config, TrainConfig
from tunedeck.engine.errors import ConfigError

SETUP_KEYS = frozenset(
    {
        "model.dtype",
        "model.gradient_checkpointing",
        "model.attn_implementation",
        "model.trust_remote_code",
        "train.per_device_eval_batch_size",
        "train.logging_steps",
        "train.save_total_limit",
        "train.use_liger_kernel",
        "train.torch_compile",
        "train.torch_compile_backend",
        "train.torch_compile_mode",
        "train.distributed",  # how processes share the work: the checkpoint's layout is the same
    }
)
OUTPUT_KEYS = ("train.output_dir", "train.run_name")
PARENT_FILE = "parent.json"

# Why a key cannot change on resume: by dotted key, else by section.
_WHY = {
    "train.seed": "changes the data order",
    "train.per_device_train_batch_size": "changes the batches",
    "train.max_steps": "changes the run's length and schedule",
    "train.num_train_epochs": "changes the run's length and schedule",
    "train.warmup_steps": "changes the schedule",
    "train.warmup_ratio": "changes the schedule",
    "train.lr_scheduler_kwargs": "changes the schedule",
    "train.adam_beta1": "changes the optimizer",
    "train.adam_beta2": "changes the optimizer",
    "train.adam_epsilon": "changes the optimizer",
    "model": "changes the model",
    "lora": "changes the adapter",
    "data": "changes the data",
}


def live_keys() -> tuple[str, ...]:
    """The train keys a run takes while it goes (read at call time: LIVE_KEYS may grow)."""
    return (*config_mod.LIVE_KEYS, autopilot.KEY)


@dataclass
class Differences:
    """The keys in which a requested config differs from a checkpoint's, each ``[old, new]``."""

    live: dict[str, list[Any]] = field(default_factory=dict)
    setup: dict[str, list[Any]] = field(default_factory=dict)
    output: dict[str, list[Any]] = field(default_factory=dict)
    refused: dict[str, list[Any]] = field(default_factory=dict)


def classify(old: Config, new: Config) -> Differences:
    out = Differences()
    live = {f"train.{k}" for k in live_keys()}
    for dotted, (a, b) in config_mod.diff(old, new).items():
        if dotted in live:
            out.live[dotted] = [a, b]
        elif dotted in SETUP_KEYS:
            out.setup[dotted] = [a, b]
        elif dotted in OUTPUT_KEYS:
            out.output[dotted] = [a, b]
        else:
            out.refused[dotted] = [a, b]
    return out


def refusal(who: str, refused: dict[str, list[Any]]) -> ConfigError:
    """One line naming every key that cannot change, its values and why."""
    parts = []
    for dotted, (a, b) in refused.items():
        why = _WHY.get(dotted) or _WHY.get(dotted.split(".")[0], "cannot change while a run goes")
        parts.append(f"{dotted} ({_show(a)} -> {_show(b)}: {why})")
    these = "it" if len(parts) == 1 else "them"
    return ConfigError(
        f"{who} cannot change {', '.join(parts)}",
        f"start a new run to change {these}; resuming takes new live values "
        f"({', '.join(live_keys())}) and another output_dir",
    )


def _show(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def prepare(folder: str | Path, requested: Config | None) -> tuple[Config, checkpoint.Resumed]:
    """Open the checkpoint at ``folder`` (its files checked first) and compare ``requested`` with its
    config. Returns the config the run is set up with (the checkpoint's, with the accepted setup and
    output values) and the checkpoint, whose ``apply`` holds the live values to apply at its step.
    Raises a one-line ConfigError naming whatever cannot change."""
    resumed = checkpoint.open_resume(folder)
    if requested is None:
        return resumed.cfg.copy(), resumed
    found = classify(resumed.cfg, requested)
    if found.refused:
        raise refusal("a resumed run", found.refused)
    cfg = resumed.cfg.copy()
    for dotted, (_, new) in {**found.setup, **found.output}.items():
        section, key = dotted.split(".", 1)
        setattr(cfg.section(section), key, new)
    apply = {dotted.split(".", 1)[1]: new for dotted, (_, new) in found.live.items()}
    return cfg, replace(resumed, apply=apply, setup=found.setup)


def rollback_values(cfg: Config, values: dict[str, Any]) -> dict[str, Any]:
    """The values sent with a rollback, checked as a resume checks them: live keys (``learning_rate`` or
    ``train.learning_rate``) pass; anything else is refused in one line, before anything is restored."""
    live, refused = {}, {}
    for key, value in values.items():
        dotted = key if "." in key else f"train.{key}"
        section, bare = dotted.split(".", 1)
        config_mod.field_help(section, bare)  # an unknown key is refused by name
        if section == "train" and bare in live_keys():
            live[bare] = value
        else:
            refused[dotted] = [getattr(cfg.section(section), bare), value]
    if refused:
        raise refusal("a rollback", refused)
    return live


# ---------------------------------------------------------------- run folders


def owner(folder: Path) -> tuple[Path | None, str | None]:
    """The run folder a checkpoint belongs to and, for one in ``branches/<n>/``, that branch."""
    folder = Path(folder)
    if folder.parent.name != "checkpoints":
        return None, None
    holder = folder.parent.parent
    if holder.parent.name == "branches":
        return holder.parent.parent, holder.name
    return holder, None


def newest_step(run_dir: Path) -> int:
    """The step of the run's newest checkpoint or ``final/`` (-1 when it has neither)."""
    steps = [-1]
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir():
        steps += [_step_of(p.name) for p in ckpts.iterdir() if p.is_dir() and p.name.startswith("step-")]
    final = run_dir / "final"
    if final.is_dir():
        try:
            steps.append(int(json.loads((final / checkpoint.STATE_FILE).read_text())["step"]))
        except (OSError, ValueError, KeyError):
            steps.append(10**12)  # a final/ of unknown step: count it as newer than anything
    return max(steps)


def _step_of(name: str) -> int:
    try:
        return int(name.removeprefix("step-"))
    except ValueError:
        return -1


def home(resume: checkpoint.Resumed, train: TrainConfig) -> Path | None:
    """The run folder a resume continues in, or None when it must start a new one: the checkpoint is
    not its run's newest state, lies in a branch, or another output_dir or run_name was asked for."""
    run, branch = owner(resume.folder)
    if run is None or branch is not None:
        return None
    before = resume.cfg.train
    if train.run_name != before.run_name:
        return None
    if train.output_dir != before.output_dir and Path(train.output_dir).resolve() != run.parent.resolve():
        return None
    if newest_step(run) > resume.step:
        return None
    return run


def output_root(resume: checkpoint.Resumed, train: TrainConfig) -> Path:
    """Where a resume's new run folder goes: the output_dir asked for, else beside the parent run (its
    config's output_dir may be relative to another working directory)."""
    run, _ = owner(resume.folder)
    if run is not None and train.output_dir == resume.cfg.train.output_dir:
        return run.parent
    return Path(train.output_dir)


def write_parent(run_dir: Path, resume: checkpoint.Resumed) -> str:
    """Record in a new run folder where it came from; returns the parent's run folder (or checkpoint)."""
    run, branch = owner(resume.folder)
    parent = str((run or resume.folder).resolve())
    record = {
        "parent": parent,
        "run_id": run.name if run is not None else None,
        "branch": branch,
        "checkpoint": str(Path(resume.folder).resolve()),
        "step": resume.step,
        "time": time.time(),
    }
    (run_dir / PARENT_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return parent
