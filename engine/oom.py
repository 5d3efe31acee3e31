"""Out of memory in a step, healed: the step is redone in smaller micro-batches, nothing is lost.

When a forward or backward pass runs out of memory, the healer frees what the failed pass held,
rewinds the step plan and the RNG to the step's start, and redoes that same step with the micro-batch
halved and the accumulation doubled. The effective batch stays, and since the loss is normalised by
the target tokens of the whole window, so does the update. Each such change is a ``change`` event
with source ``auto`` and its reason, kept in the change log and the checkpoints like any other.
At batch 1 it turns on gradient checkpointing; when that is not enough either, the run ends with
the advice. An optimizer update that runs out of memory is not about the batch (activations are
gone by then) and may have half-updated the weights, so it is never redone: the run ends.

``TUNEDECK_FAULT_OOM_TOKENS=N`` makes a training micro-batch whose padded input holds more than N
tokens raise ``torch.OutOfMemoryError`` in its forward pass, so all this can be watched on a CPU.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from tunedeck.engine import model as model_mod
from tunedeck.engine.errors import ConfigError, TunedeckError

if TYPE_CHECKING:
    from tunedeck.engine.trainer import Trainer

FAULT_ENV = "TUNEDECK_FAULT_OOM_TOKENS"
MAX_ACCUMULATION = 4096  # config's own limit for gradient_accumulation_steps
LAST_ADVICE = (
    "lower data.max_length, load the model in 4-bit (model.load_in_4bit) or pick a smaller model; "
    "the last checkpoint is kept"
)
UPDATE_ADVICE = (
    "use an 8-bit optimizer (train.optim=adamw_8bit), train fewer weights (LoRA, a smaller lora.r) "
    "or load the model in 4-bit (model.load_in_4bit); the last checkpoint is kept"
)

T = TypeVar("T")


def install_fault(model: torch.nn.Module) -> Any:
    """With ``TUNEDECK_FAULT_OOM_TOKENS=N`` set, a forward pre-hook that raises ``OutOfMemoryError``
    for a training micro-batch of more than N padded tokens; returns its handle, or None when unset."""
    raw = os.environ.get(FAULT_ENV, "").strip()
    if not raw:
        return None
    try:
        limit = int(raw)
    except ValueError:
        raise ConfigError(
            f"{FAULT_ENV}={raw!r} is not a whole number", f"unset {FAULT_ENV}, or give a token count"
        ) from None

    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if module.training and isinstance(ids, torch.Tensor) and ids.numel() > limit:
            raise torch.OutOfMemoryError(
                f"{FAULT_ENV}={limit}: a micro-batch of {ids.numel()} tokens {tuple(ids.shape)} is over it"
            )

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def smaller_batch(batch_size: int, accumulation: int) -> tuple[int, int] | None:
    """Half the micro-batch (or the largest size below half that divides the effective batch, for an
    odd one) and the accumulation that keeps ``batch_size x accumulation``; None at batch 1."""
    effective = batch_size * accumulation
    for size in range(batch_size // 2, 0, -1):
        if effective % size == 0 and effective // size <= MAX_ACCUMULATION:
            return size, effective // size
    return None


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class Healer:
    """Runs the trainer's optimizer steps, redoing one that runs out of memory in smaller pieces."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self._updating = False

    @contextlib.contextmanager
    def updating(self) -> Iterator[None]:
        """Around the optimizer's update: out of memory in here ends the run (see the module). The flag
        stays up when the update raises, for :meth:`run` to see."""
        self._updating = True
        yield
        self._updating = False

    def run(self, step: Callable[[], T]) -> T:
        trainer = self.trainer
        while True:
            assert trainer.plan is not None
            plan, rng = trainer.plan.state_dict(), _rng_state()
            self._updating = False
            try:
                return step()
            except torch.OutOfMemoryError as e:
                if trainer.dist.enabled:
                    # The other ranks are already inside this step's collectives: a smaller batch on one
                    # rank alone would break their lockstep, so the run ends on every rank instead.
                    raise
                message = (str(e).strip().splitlines() or ["out of memory"])[0]
                if self._updating:
                    raise TunedeckError(
                        f"out of memory in the optimizer update of step {trainer.step + 1} ({message})",
                        kind="oom",
                        advice=UPDATE_ADVICE,
                    ) from None
            # Out of the except block, the traceback and the activations its frames held are gone.
            self._free()
            trainer.plan.load_state_dict(plan)
            _set_rng_state(rng)
            if not self._shrink(message):
                raise TunedeckError(
                    f"out of memory in step {trainer.step + 1} at batch 1 with gradient checkpointing "
                    f"({message})",
                    kind="oom",
                    advice=LAST_ADVICE,
                )

    def _free(self) -> None:
        opt = getattr(self.trainer, "optimizer", None)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _shrink(self, message: str) -> bool:
        """Make the next try need less memory, recorded as a change; False when nothing is left to try."""
        trainer = self.trainer
        assert trainer.plan is not None
        plan, t = trainer.plan, trainer.cfg.train
        at = f"out of memory in step {plan.step + 1} ({message})"
        smaller = smaller_batch(plan.batch_size, plan.accumulation)
        if smaller is not None:
            size, accumulation = smaller
            changes: dict[str, list[Any]] = {
                "per_device_train_batch_size": [plan.batch_size, size],
                "gradient_accumulation_steps": [plan.accumulation, accumulation],
            }
            changes.update(trainer.live.replan(size, accumulation))
            t.per_device_train_batch_size, t.gradient_accumulation_steps = size, accumulation
            reason = (
                f"{at}: the micro-batch halved and the accumulation doubled, the same effective batch "
                f"of {size * accumulation}; the step is redone from the same examples"
            )
            trainer._record(changes, "auto", reason=reason)
            return True
        if not trainer.cfg.model.gradient_checkpointing:
            model_mod.enable_gradient_checkpointing(trainer.model, lora=trainer.cfg.lora.enabled)
            trainer.cfg.model.gradient_checkpointing = True
            reason = f"{at} at batch 1: activations are recomputed in the backward pass from now on"
            trainer._record({"gradient_checkpointing": [False, True]}, "auto", reason=reason)
            return True
        return False
