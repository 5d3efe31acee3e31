"""The learning-rate range test (Smith, "Cyclical Learning Rates for Training Neural Networks";
fastai's ``lr_find``), on the run as it is now, leaving the run exactly as it was.

The sweep takes real optimizer steps (the run's batch size, accumulation, clipping and optimizer)
on the next examples of the run's data, with the learning rate rising exponentially from
``start_lr`` to ``end_lr``; it stops early once the loss, averaged as it goes (a debiased moving
average), exceeds four times its lowest value (the loss has diverged). Before it, the trainable weights, the optimizer state, the RNG and
the step plan are copied; after it they are put back, so a run with a find in its middle equals the
same run without (bit for bit on the CPU). The sweep reads the data through a plan of its own that
starts at the run's position; the run's plan is never moved.

The curve is then smoothed without lag (a centred moving average over about a twentieth of the
sweep on each side: a moving average that only looks back, as fastai's with 0.98, trails a sweep of
100 steps by tens of steps, which shifts every suggestion to larger learning rates). Two suggestions
come from it: the learning rate of its steepest descent against log(lr), and the learning rate of
its minimum divided by 10 (the rule fastai's first versions taught). Both are reported; the first is
``suggestion``.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tunedeck.engine.errors import TunedeckError
from tunedeck.engine.plan import StepPlan
from tunedeck.engine.protocol import FindLR, LrFindEvent, ProgressEvent

if TYPE_CHECKING:
    from tunedeck.engine.trainer import Trainer

RUNNING = 0.9  # the running average that watches for divergence during the sweep
DIVERGED = 4.0  # stop once that average is this many times its lowest value
RESULT_FILE = "lr_find.json"


class _Snapshot:
    """What the sweep changes, copied (to the host, so a GPU needs no room for a second copy)."""

    def __init__(self, trainer: Trainer) -> None:
        self.weights = [(p, p.detach().to("cpu", copy=True)) for p in trainer.trainable]
        self.optimizer = _to_cpu(copy.deepcopy(trainer.optimizer.state_dict()))
        self.rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            self.rng["cuda"] = torch.cuda.get_rng_state_all()
        assert trainer.plan is not None
        self.plan = trainer.plan
        self.plan_state = trainer.plan.state_dict()
        self.training = trainer.model.training

    def restore(self, trainer: Trainer) -> None:
        with torch.no_grad():
            for p, saved in self.weights:
                p.copy_(saved)
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.optimizer.load_state_dict(self.optimizer)
        torch.set_rng_state(self.rng["cpu"])
        if "cuda" in self.rng:
            torch.cuda.set_rng_state_all(self.rng["cuda"])
        trainer.plan = self.plan
        self.plan.load_state_dict(self.plan_state)
        trainer.model.train(self.training)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def learning_rates(options: FindLR) -> list[float]:
    ratio = options.end_lr / options.start_lr
    return [options.start_lr * ratio ** (i / (options.steps - 1)) for i in range(options.steps)]


def running(losses: list[float], beta: float = RUNNING) -> float:
    """The exponential moving average of ``losses`` at the last one, debiased as Adam's moments."""
    avg = 0.0
    for loss in losses:
        avg = beta * avg + (1 - beta) * loss
    return avg / (1 - beta ** len(losses))


def smooth(losses: list[float], planned_steps: int) -> list[float]:
    """A centred moving average of ``losses``: ``planned_steps // 20`` points (at least 1) each side,
    fewer at the ends."""
    k = max(1, planned_steps // 20)
    out = []
    for i in range(len(losses)):
        window = losses[max(0, i - k) : i + k + 1]
        out.append(sum(window) / len(window))
    return out


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float | None, float | None]:
    """(steepest descent, minimum / 10) of a smoothed curve; None where the curve is too short."""
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    if not finite:
        return None, None
    low = min(finite, key=lambda i: smoothed[i])
    min_div_10 = lrs[low] / 10
    if low < 2:  # no descent before the minimum to measure
        return None, min_div_10
    slope = np.gradient(np.array(smoothed[: low + 1]), np.log(np.array(lrs[: low + 1])))
    # Interior points only: at either end the slope is one-sided (and at the minimum it is ~0).
    return float(lrs[1 + int(np.argmin(slope[1:low]))]), min_div_10


def _sweep_step(trainer: Trainer, lr: float) -> float:
    """One optimizer step of the sweep at ``lr``; its loss (read before the update, as the run's)."""
    batches, n_targets, _ = trainer._next_batches()
    loss_sum = torch.zeros((), device=trainer.device)
    for b in batches:
        with trainer._compute():
            out = trainer.model(**trainer._to_device(b), num_items_in_batch=n_targets)
        out.loss.backward()
        loss_sum += out.loss.detach()
    loss = float(loss_sum)
    if math.isfinite(loss):
        clip = trainer.cfg.train.max_grad_norm
        torch.nn.utils.clip_grad_norm_(trainer.trainable, clip if clip > 0 else float("inf"))
        for g in trainer.optimizer.param_groups:
            g["lr"] = lr
        trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return loss


def _sweep(trainer: Trainer, options: FindLR) -> tuple[list[float], list[float], str]:
    assert trainer.plan is not None
    run_plan = trainer.plan
    # A plan of its own from the run's data position, with a budget of exactly the sweep's steps.
    trainer.plan = StepPlan(
        run_plan.examples,
        run_plan.batch_size,
        run_plan.accumulation,
        total_steps=options.steps,
        seen=run_plan.seen,
        micro_left=options.steps * run_plan.accumulation,
    )
    trainer.model.train()
    lrs, losses, best, stopped = [], [], math.inf, "completed"
    schedule = learning_rates(options)
    trainer.emit(ProgressEvent(stage="find_lr", done=0, total=len(schedule), unit="steps"))
    for i, lr in enumerate(schedule):
        if trainer.cancel.is_set():
            stopped = "cancelled"
            break
        loss = _sweep_step(trainer, lr)
        lrs.append(lr)
        losses.append(loss)
        trainer.emit(ProgressEvent(stage="find_lr", done=i + 1, total=len(schedule), unit="steps"))
        current = running(losses)
        best = min(best, current)
        if not math.isfinite(current) or current > DIVERGED * best:
            stopped = "diverged"
            break
    if stopped != "completed":
        trainer.emit(ProgressEvent(stage="find_lr", done=len(schedule), total=len(schedule), unit="steps"))
    return lrs, losses, stopped


def find(trainer: Trainer, options: FindLR) -> LrFindEvent:
    """Run the range test on ``trainer`` as it is now, put everything back, write the curve to
    ``<run>/lr_find.json`` and return the ``lr_find`` event (emitted by the caller)."""
    options.check()
    snapshot = _Snapshot(trainer)
    try:
        try:
            lrs, losses, stopped = _sweep(trainer, options)
        finally:
            snapshot.restore(trainer)
    except torch.OutOfMemoryError:
        raise TunedeckError(
            "find_lr ran out of memory; the run is as it was before it",
            kind="oom",
            advice="lower train.per_device_train_batch_size (set it live) and try again",
        ) from None
    # A non-finite loss ends the sweep as diverged; the curve keeps the finite points.
    kept = [(lr, loss) for lr, loss in zip(lrs, losses) if math.isfinite(loss)]
    lrs, losses = [lr for lr, _ in kept], [loss for _, loss in kept]
    smoothed = smooth(losses, options.steps)
    suggestion, min_div_10 = suggest(lrs, smoothed)
    path = write(
        trainer.run_dir, trainer.step, options, lrs, losses, smoothed, suggestion, min_div_10, stopped
    )
    return LrFindEvent(
        step=trainer.step,
        lrs=lrs,
        losses=losses,
        smoothed=smoothed,
        suggestion=suggestion,
        lr_min_div_10=min_div_10,
        stopped=stopped,
        path=str(path) if path else "",
    )


def write(
    run_dir: Path | None,
    step: int,
    options: FindLR,
    lrs: list[float],
    losses: list[float],
    smoothed: list[float],
    suggestion: float | None,
    min_div_10: float | None,
    stopped: str,
) -> Path | None:
    """``<run>/lr_find.json``, written whole or not at all (the latest find replaces the one before)."""
    if run_dir is None:
        return None
    path = Path(run_dir) / RESULT_FILE
    body = {
        "step": step,
        "start_lr": options.start_lr,
        "end_lr": options.end_lr,
        "steps": options.steps,
        "stopped": stopped,
        "suggestion": suggestion,
        "lr_min_div_10": min_div_10,
        "lrs": lrs,
        "losses": losses,
        "smoothed": smoothed,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=1))
    tmp.replace(path)
    return path
