"""Everything about a run that can be refused before the model loads, each with one line.

The CLI calls :func:`check` before it starts a session, the window before its Start does, and
the trainer once more as its first step of setup (so a session started any other way gets the same
refusals). Nothing here loads a model or reads a dataset: a mistake found here costs a second, not
the minutes of a model load.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from tunedeck.engine import durable, paths
from tunedeck.engine.config import Config
from tunedeck.engine.errors import ConfigError, TunedeckError

# A stand-in for the run's length when the data has not been read: schedules are checked at their
# warm-up, middle and end, which any length above the warm-up exercises alike.
_PLANNED_STEPS = 1000
_KERNEL_FS = ("/proc", "/sys")


def check(
    cfg: Config, resume: str | Path | None = None, world_size: int = 1, writes_run_folder: bool = True
) -> None:
    """Raise the first problem :func:`problems` would find (a :class:`TunedeckError`), without
    looking further: the checks that need no torch come first, so most mistakes cost no import."""
    for problem in _found(cfg, resume, world_size, writes_run_folder):
        raise problem


def problems(
    cfg: Config, resume: str | Path | None = None, world_size: int = 1, writes_run_folder: bool = True
) -> list[TunedeckError]:
    """Every problem found with ``cfg`` on this machine, in the order a user would fix them.
    ``resume``: the checkpoint a run continues from; ``world_size``: the processes of the run;
    ``writes_run_folder``: False in the processes of a run that leave it to rank 0."""
    return list(_found(cfg, resume, world_size, writes_run_folder))


def _found(
    cfg: Config, resume: str | Path | None, world_size: int, writes_run_folder: bool
) -> Iterator[TunedeckError]:
    steps: list[Callable[[], None]] = [
        lambda: _model(cfg),
        lambda: _data(cfg),
        lambda: writable_folder(*_run_parent(cfg, resume)) if writes_run_folder else None,
        lambda: _hardware(cfg, world_size),
        lambda: _schedule(cfg),
    ]
    for step in steps:
        try:
            step()
        except TunedeckError as e:
            yield e


def _model(cfg: Config) -> None:
    missing = paths.missing_model(cfg.model.name_or_path)
    if missing is not None:
        raise missing


def _data(cfg: Config) -> None:
    missing = paths.missing_dataset(cfg.data.path)
    if missing is not None:
        raise missing


def _hardware(cfg: Config, world_size: int) -> None:
    import torch

    from tunedeck.engine import distributed, model, optim

    optim.check_available(cfg.train.optim)
    distributed.check(cfg, world_size)
    model.quantization_config(cfg, torch.float32)
    model.resolve_dtype(cfg.model.dtype, model.pick_device())
    if cfg.model.attn_implementation == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise ConfigError(
                "model.attn_implementation=flash_attention_2 needs the flash-attn package and a CUDA GPU, "
                "and this machine lacks " + ("the package" if torch.cuda.is_available() else "a CUDA GPU"),
                "set model.attn_implementation=sdpa, PyTorch's own fused attention",
            )


def _schedule(cfg: Config) -> None:
    from tunedeck.engine import schedule

    t = cfg.train
    total = t.max_steps if t.max_steps > 0 else _PLANNED_STEPS
    warmup = schedule.warmup_steps_for(total, t.warmup_steps, t.warmup_ratio)
    schedule.check(t.lr_scheduler_type, t.lr_scheduler_kwargs, total, warmup, t.learning_rate)


def _run_parent(cfg: Config, resume: str | Path | None) -> tuple[Path, str]:
    """The folder a run's files go into, and the setting that names it: for a resume, its run's
    folder when it continues there, else where its new run folder goes (see :mod:`resume`)."""
    if resume is not None:
        from tunedeck.engine import checkpoint
        from tunedeck.engine import resume as resume_mod

        opened = checkpoint.open_resume(resume)
        home = resume_mod.home(opened, cfg.train)
        if home is not None:
            return home, f"the run folder of {resume}"
        root = resume_mod.output_root(opened, cfg.train)
        return root, f"train.output_dir={root}"
    return Path(cfg.train.output_dir).expanduser(), f"train.output_dir={cfg.train.output_dir}"


def writable_folder(folder: Path, name: str) -> None:
    """Refuse a folder that cannot hold a run: a file, a kernel file system, read-only, not ours.

    The folder need not exist yet; its nearest existing parent is tried with a real (empty,
    removed at once) file, which is the only test that sees read-only mounts and root alike.
    """
    folder = Path(folder).absolute()
    real = Path(os.path.realpath(folder))
    for fs in _KERNEL_FS:
        if real == Path(fs) or Path(fs) in real.parents:
            raise ConfigError(
                f"{name} is under {fs}, a kernel file system that cannot hold files",
                "choose a folder on a disk, e.g. runs or ~/tunedeck-runs",
            )
    parent = folder
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        where = "is a file" if parent == folder else f"is inside {parent}, which is a file"
        raise ConfigError(f"{name} {where}, not a folder", "choose a folder; a missing one is created")
    try:
        fd, probe = tempfile.mkstemp(prefix=".tunedeck-probe-", dir=parent)
    except OSError as e:
        if e.errno == errno.EROFS:
            cause = f"is on a read-only file system ({parent})"
        elif e.errno in (errno.EACCES, errno.EPERM):
            cause = f"is not writable (permission denied on {parent})"
        else:
            cause = f"cannot be written: {durable.describe(e, parent)}"
        raise ConfigError(f"{name} {cause}", "choose a folder you can write to") from None
    os.close(fd)
    os.unlink(probe)
