"""Atomic checkpoints: everything needed to continue a run exactly, and nothing unpickled on load.

A checkpoint folder holds the PEFT adapter (``adapter_model.safetensors`` + ``adapter_config.json``,
loadable with ``PeftModel.from_pretrained``) or, for full fine-tuning, ``model.safetensors``; the
tokenizer; ``optimizer.pt`` (tensors and plain values only, read with ``weights_only=True``);
``rng_state.pt``; ``trainer_state.json`` (step, schedule, data position, change log, live values)
and the effective ``config.yaml``. It is written into a hidden temporary folder, synced and renamed
(an existing folder is swapped in one step), so a crash never leaves half a checkpoint under the
final name (:mod:`~tunedeck.engine.durable`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunedeck.engine import config as config_mod
from tunedeck.engine import durable
from tunedeck.engine.config import Config
from tunedeck.engine.errors import ConfigError

STATE_FILE = "trainer_state.json"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


@dataclass(frozen=True)
class Gathered:
    """What a run on several processes gathered for rank 0 to write, in the one-process layout: the
    full weights and optimizer state under FSDP2 (None: the model and optimizer hold them whole) and
    every process's RNG state (``rng_state.pt``'s ``ranks``)."""

    model: dict[str, Any] | None = None
    optimizer: dict[str, Any] | None = None
    rng_ranks: list[dict[str, torch.Tensor]] | None = None


def _save_weights(model: Any, folder: Path, state_dict: dict[str, Any] | None) -> None:
    # PeftModel.save_pretrained writes only the adapter; a plain model writes its full weights.
    kwargs = {"state_dict": state_dict} if state_dict is not None else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)


def write(
    folder: Path,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    cfg: Config,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None,
    gathered: Gathered | None = None,
) -> Path:
    """Write a checkpoint at ``folder`` atomically and return its path; a failed write raises
    :class:`~tunedeck.engine.durable.WriteFailed` naming its cause, and leaves no trace."""
    gathered = gathered or Gathered()
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    durable.recover_dir(folder)
    tmp = folder.parent / f".tmp-{folder.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _save_weights(model, tmp, gathered.model)
        tokenizer.save_pretrained(tmp)
        config_mod.save(cfg, tmp / "config.yaml")
        if optimizer is not None:
            optim_state = gathered.optimizer if gathered.optimizer is not None else optimizer.state_dict()
            torch.save(optim_state, tmp / "optimizer.pt")
            rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            if gathered.rng_ranks is not None:
                rng["ranks"] = gathered.rng_ranks
            torch.save(rng, tmp / "rng_state.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        durable.install_dir(tmp, folder)
    except Exception as e:
        cause = durable.describe(e, folder.parent)  # now: once cleaned up, a full disk no longer looks full
        shutil.rmtree(tmp, ignore_errors=True)
        durable.recover_dir(folder)
        raise durable.WriteFailed(cause) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        durable.recover_dir(folder)
        raise
    return folder


def estimate_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """About what a checkpoint of ``model`` takes before one was written: its trainable weights (the
    adapter, or every weight for full fine-tuning), the optimizer's tensors, and a margin for the
    tokenizer and small files."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    moments = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            moments += sum(
                v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor)
            )
    return weights + moments + 1_000_000


def read_config(folder: Path) -> Config:
    """The config a checkpoint or ``final/`` folder was written with."""
    folder = Path(folder)
    if not (folder / "config.yaml").is_file():
        raise ConfigError(
            f"{folder} holds no config.yaml, so it is not a Tunedeck checkpoint or final folder",
            "give a folder such as runs/<run>/final or runs/<run>/checkpoints/step-000200",
        )
    return config_mod.load(folder / "config.yaml")


# What a checkpoint must hold to be resumed exactly (besides its weights), checked before anything loads.
RESUME_FILES = ("config.yaml", STATE_FILE, "optimizer.pt", "rng_state.pt")
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors")


def read_state(folder: Path) -> tuple[Config, dict[str, Any]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(
            f"checkpoint {folder} does not exist", "give a folder such as runs/<run>/checkpoints/step-000200"
        )
    if not (folder / STATE_FILE).is_file():
        raise ConfigError(
            f"{folder} is not a Tunedeck checkpoint (no {STATE_FILE})",
            "give a folder such as runs/<run>/checkpoints/step-000200",
        )
    if not (folder / "optimizer.pt").is_file():
        raise ConfigError(
            f"{folder} holds weights but no optimizer state, so it cannot be resumed exactly",
            "resume from a folder under checkpoints/",
        )
    missing = [n for n in RESUME_FILES if not (folder / n).is_file()]
    if not any((folder / n).is_file() for n in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise ConfigError(
            f"checkpoint {folder} is incomplete (no {', '.join(missing)}), so it cannot be resumed",
            "resume from another checkpoint of the run",
        )
    cfg = config_mod.load(folder / "config.yaml")
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(
            f"checkpoint {folder} is damaged: {STATE_FILE} is not JSON", "resume from another checkpoint"
        ) from None
    return cfg, state


@dataclass(frozen=True)
class Resumed:
    """A checkpoint opened to resume from: its folder, its config and its trainer state. ``apply``: live
    values given anew, applied at the resume step; ``setup``: other accepted differences of the config
    (``{dotted key: [old, new]}``), recorded with them (see :mod:`tunedeck.engine.resume`)."""

    folder: Path
    cfg: Config
    state: dict[str, Any]
    apply: dict[str, Any] = field(default_factory=dict)
    setup: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))


def open_resume(folder: str | Path) -> Resumed:
    cfg, state = read_state(Path(folder))
    return Resumed(Path(folder), cfg, state)


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    from safetensors.torch import load_file

    folder = Path(folder)
    adapter = folder / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(adapter, device=str(_device_of(model))))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ConfigError(
                f"the adapter in {folder} does not fit this model ({unexpected[0]})",
                "resume with the model the checkpoint was made with",
            )
        return
    full = folder / "model.safetensors"
    if not full.is_file():
        raise ConfigError(f"{folder} holds no weights", "give a complete checkpoint folder")
    model.load_state_dict(load_file(full, device=str(_device_of(model))), strict=False)


def read_optimizer(folder: Path) -> dict[str, Any]:
    return torch.load(Path(folder) / "optimizer.pt", weights_only=True, map_location="cpu")


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    # On the CPU first: torch's load_state_dict moves each moment to its parameter's device and keeps
    # ``step`` where the optimizer wants it (CPU unless fused or capturable).
    optimizer.load_state_dict(read_optimizer(folder))


def read_rng(folder: Path) -> dict[str, Any]:
    return torch.load(Path(folder) / "rng_state.pt", weights_only=True)


def load_rng(folder: Path) -> None:
    rng = read_rng(folder)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def prune(checkpoints: Path, keep: int, protect: set[str] | frozenset[str] = frozenset()) -> None:
    """Keep the ``keep`` newest step folders (0 keeps all), and those named in ``protect``; remove
    what a crash left half-written."""
    if not checkpoints.is_dir():
        return
    for left in checkpoints.iterdir():
        if left.name.startswith((".tmp-", ".old-")) and left.is_dir():
            durable.recover_dir(checkpoints / left.name.split("-", 1)[1])
            shutil.rmtree(left, ignore_errors=True)
    if keep <= 0:
        return
    steps = sorted(p for p in checkpoints.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in steps[:-keep]:
        if old.name not in protect:
            shutil.rmtree(old, ignore_errors=True)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
