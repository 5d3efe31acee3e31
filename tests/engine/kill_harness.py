"""SIGKILL at random moments during checkpoint writes, then every surviving checkpoint checked.

``python -m tests.engine.kill_harness OUT --kills 24 --seed 1`` prints one JSON summary line.
One process imports torch, trains a reference run and sets trainers up once; each trial is a child
forked from it (a real process, killed with SIGKILL) that trains or saves with one of them, so a
trial costs its writes, not an interpreter start and a model load.

Two kinds of trial, alternately:

- ``fresh``: a training run that saves every step; killed during (or just after) its n-th write.
- ``resave``: a copy of the reference run whose existing folders are written again: a checkpoint
  resumed and saved over its own folder (a stop right after a periodic save), then ``final/``;
  killed during one of those writes, when the old folder and the new one are swapped.

Afterwards every folder under a real name must be complete: a checkpoint's files equal one of the
reference's checkpoints (all but run-specific fields), and each distinct checkpoint resumes to
the reference's losses bit for bit; a ``final/`` holds a complete adapter of one of them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import queue
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch

from tunedeck.engine import checkpoint
from tunedeck.engine import config as config_mod
from tunedeck.engine.protocol import StepEvent
from tunedeck.engine.trainer import Trainer

STEPS = 6
PRESET = Path(__file__).resolve().parents[2] / "resources" / "presets" / "demo.yaml"
RUN_FIELDS = ("elapsed_s", "run_id")  # what differs between two runs of the same steps


def make_cfg(out: Path, name: str) -> config_mod.Config:
    return config_mod.apply_overrides(
        config_mod.load(PRESET),
        [
            f"train.output_dir={out}",
            f"train.run_name={name}",
            f"train.max_steps={STEPS}",
            "train.save_steps=1",
            "train.eval_steps=0",
            "train.warmup_ratio=0",
            "train.lr_scheduler_type=linear",
            "lora.dropout=0",
            "lora.r=4",
            "data.max_length=64",
        ],
    )


def train(cfg: config_mod.Config, resume: Path | None = None) -> tuple[dict[int, float], Trainer]:
    losses: dict[int, float] = {}

    def emit(e: Any) -> None:
        if isinstance(e, StepEvent):
            losses[e.step] = e.loss

    opened = checkpoint.open_resume(resume) if resume is not None else None
    t = Trainer(cfg if opened is None else opened.cfg, emit, queue.Queue(), resume=opened)
    end = t.run()
    assert end.status == "completed", end
    return losses, t


def digest(folder: Path) -> str:
    """A checkpoint's content, without what differs between runs (timings, run id, run name)."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.name in ("config.yaml", checkpoint.STATE_FILE):
            continue
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    state = json.loads((folder / checkpoint.STATE_FILE).read_text())
    for key in RUN_FIELDS:
        state.pop(key, None)
    h.update(json.dumps(state, sort_keys=True).encode())
    return h.hexdigest()


def loads(folder: Path) -> None:
    """Read every file of a checkpoint as resuming reads it (no model needed)."""
    from safetensors.torch import load_file

    opened = checkpoint.open_resume(folder)
    assert opened.state["step"] >= 1
    load_file(folder / "adapter_model.safetensors")
    torch.load(folder / "optimizer.pt", weights_only=True)
    torch.load(folder / "rng_state.pt", weights_only=True)


# ---------------------------------------------------------------- trials (in forked children)


class Writers:
    """Trainers set up once in the harness, for the children to fork from: set-up costs a model
    load and the data, which 24 children need not repeat. Each holds the global RNG state its
    setup left, which a child puts back (the harness's own setups move it)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.fresh = Trainer(make_cfg(out, "proto"), lambda e: None, queue.Queue())
        self.fresh.setup()
        self.fresh_rng = torch.get_rng_state()
        self.resumed: dict[int, Trainer] = {}

    def resumed_at(self, step: int) -> Trainer:
        if step not in self.resumed:
            folder = self.out / "ref" / "checkpoints" / checkpoint.step_dir_name(step)
            opened = checkpoint.open_resume(folder)
            t = Trainer(opened.cfg, lambda e: None, queue.Queue(), resume=opened)
            t.setup()
            self.resumed[step] = t
        return self.resumed[step]


def fresh_child(writers: Writers, run: Path) -> None:
    """A run from step 0 that saves every step, as the reference run did, into its own folder."""
    t = writers.fresh
    torch.set_rng_state(writers.fresh_rng)
    run.mkdir()
    t.run_dir = run
    assert t.train() == "completed"


def resave_child(writers: Writers, run: Path, step: int) -> None:
    """A checkpoint resumed and saved over its own folder, then final/, again and again."""
    folder = run / "checkpoints" / checkpoint.step_dir_name(step)
    t = writers.resumed_at(step)
    checkpoint.load_rng(folder)
    for _ in range(50):  # until killed: the same folders, written again and again
        assert t.save_checkpoint(folder) == folder
        assert t.save_checkpoint(run / "final", with_optimizer=False) == run / "final"


def tmp_dirs(run: Path) -> set[str]:
    found = set()
    for where in (run, run / "checkpoints"):
        with contextlib.suppress(FileNotFoundError):
            found |= {e.name for e in os.scandir(where) if e.name.startswith(".tmp-")}
    return found


def trial(kind: str, writers: Writers, name: str, rng: random.Random) -> dict[str, Any] | None:
    """Fork a child that writes checkpoints; SIGKILL it at a random moment of its n-th write."""
    run = writers.out / name
    if kind == "resave":
        shutil.copytree(writers.out / "ref", run)
        step = rng.randint(1, STEPS - 1)
        writers.resumed_at(step)  # set up here, once, not in the child
        nth = rng.randint(1, 6)
    else:
        nth = rng.randint(1, STEPS)  # STEPS - 1 checkpoints, then final/
    pid = os.fork()
    if pid == 0:  # the child: write, and never return into the harness
        code = 0
        try:
            if kind == "resave":
                resave_child(writers, run, step)
            else:
                fresh_child(writers, run)
        except BaseException:
            code = 3
        os._exit(code)
    seen, present, killed, in_write = 0, set(), False, False
    while True:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        now = tmp_dirs(run)
        seen += len(now - present)
        present = now
        if seen >= nth:
            time.sleep(rng.uniform(0, 0.06))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            killed, in_write = True, bool(tmp_dirs(run))
            break
        time.sleep(0.0005)
    if not killed:
        return None  # it finished before its n-th write: no kill, not counted
    return {"kind": kind, "run": name, "nth_write": nth, "in_write": in_write}


# ---------------------------------------------------------------- checks


def check(out: Path, ref_losses: dict[int, float], ref_digests: dict[str, int], trials: list[dict]) -> dict:
    surviving, finals, bad = 0, 0, []
    unique: dict[str, Path] = {}
    adapters = {
        hashlib.sha256((p / "adapter_model.safetensors").read_bytes()).hexdigest()
        for p in (out / "ref" / "checkpoints").iterdir()
        if p.name.startswith("step-")
    } | {hashlib.sha256((out / "ref" / "final" / "adapter_model.safetensors").read_bytes()).hexdigest()}
    for t in trials:
        run = out / t["run"]
        ckpts = run / "checkpoints"
        for folder in sorted(ckpts.iterdir()) if ckpts.is_dir() else []:
            if not folder.name.startswith("step-"):
                continue  # hidden leftovers of a killed write: never read as a checkpoint
            surviving += 1
            try:
                loads(folder)
                d = digest(folder)
            except Exception as e:
                bad.append(f"{folder}: {type(e).__name__}: {e}")
                continue
            if ref_digests.get(d) != int(folder.name.split("-")[1]):
                bad.append(f"{folder}: content differs from the reference's checkpoint of that step")
            unique.setdefault(d, folder)
        final = run / "final"
        if final.exists():
            finals += 1
            try:
                checkpoint.read_config(final)
                json.loads((final / "adapter_config.json").read_text())
                a = hashlib.sha256((final / "adapter_model.safetensors").read_bytes()).hexdigest()
                if a not in adapters:
                    bad.append(f"{final}: its adapter is none of the reference's")
            except Exception as e:
                bad.append(f"{final}: {type(e).__name__}: {e}")
    exact = 0
    for folder in unique.values():
        step = checkpoint.open_resume(folder).state["step"]
        losses, _ = train(make_cfg(out, "unused"), resume=copy_alone(folder, out / "resumes"))
        want = {s: v for s, v in ref_losses.items() if s > step}
        if losses == want:
            exact += 1
        else:
            bad.append(f"{folder}: resumed losses {losses} != {want}")
    return {
        "checkpoints_surviving": surviving,
        "distinct_checkpoints": len(unique),
        "resumed_exactly": exact,
        "final_folders_complete": finals - sum(1 for b in bad if "/final" in b),
        "problems": bad,
    }


def copy_alone(folder: Path, root: Path) -> Path:
    """A checkpoint copied into a run of its own, so that resuming it writes nowhere it was."""
    target = root / f"{folder.parent.parent.name}-{folder.name}" / "checkpoints" / folder.name
    shutil.copytree(folder, target)
    return target


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--kills", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    out: Path = args.out
    rng = random.Random(args.seed)
    began = time.monotonic()
    ref_losses, ref_trainer = train(make_cfg(out, "ref"))
    assert ref_trainer.run_dir == out / "ref"
    ref_digests = {digest(f): int(f.name.split("-")[1]) for f in (out / "ref" / "checkpoints").iterdir()}
    writers = Writers(out)
    trials: list[dict] = []
    attempts = 0
    while len(trials) < args.kills and attempts < 4 * args.kills:
        kind = "fresh" if attempts % 2 == 0 else "resave"
        result = trial(kind, writers, f"k{attempts:03d}", rng)
        attempts += 1
        if result is not None:
            trials.append(result)
    summary = {
        "kills": len(trials),
        "kills_in_write": sum(t["in_write"] for t in trials),
        "fresh": sum(t["kind"] == "fresh" for t in trials),
        "resave": sum(t["kind"] == "resave" for t in trials),
        **check(out, ref_losses, ref_digests, trials),
        "seconds": round(time.monotonic() - began, 1),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
