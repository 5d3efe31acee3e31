"""The run's live settings: a ``set`` validated as a whole, then applied from the next step.

Every live change goes through here, whoever asks for it: the user (a ``set`` command, the window's
Apply), a resume with new values, a rollback with new values, an autopilot rule, the out-of-memory
healer. A refused value changes nothing; an accepted one moves what depends on it (the schedule's base
or shape, the step plan, the optimizer, weight decay) and the config, and the caller records the
changes (``Trainer._record``) so they are marked on the curves and kept in checkpoints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tunedeck.engine import autopilot, optim
from tunedeck.engine import config as config_mod
from tunedeck.engine.config import LIVE_KEYS, validate_value
from tunedeck.engine.errors import ConfigError
from tunedeck.engine.protocol import WarningEvent

if TYPE_CHECKING:
    from tunedeck.engine.trainer import Trainer


class LiveSettings:
    """The live settings of one trainer's run (``trainer.live``)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def check(self, values: dict[str, Any], against: config_mod.TrainConfig | None = None) -> dict[str, Any]:
        """The values validated (``against``: the live values they will meet, when not the current ones)."""
        tr = self.trainer
        t = against or tr.cfg.train
        checked: dict[str, Any] = {}
        for key, raw in values.items():
            if key == autopilot.KEY:
                checked[key] = autopilot.updated(t.autopilot, raw)
                continue
            if key not in LIVE_KEYS:
                raise ConfigError(
                    f"{key} cannot be changed while a run goes", f"live-changeable: {', '.join(LIVE_KEYS)}"
                )
            checked[key] = validate_value("train", key, raw)
        if "optim" in checked:
            optim.check_available(checked["optim"])
        return checked

    def apply(self, checked: dict[str, Any]) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        """Apply checked live values; returns the changes and the automatic changes they caused."""
        tr = self.trainer
        assert tr.plan is not None
        t = tr.cfg.train
        changes = {k: [getattr(t, k), v] for k, v in checked.items() if getattr(t, k) != v}
        auto: dict[str, list[Any]] = {}
        if not changes:
            return changes, auto
        if "learning_rate" in changes:
            tr.schedule.set_base_lr(checked["learning_rate"])
        if "lr_scheduler_type" in changes:
            tr.schedule.switch(checked["lr_scheduler_type"], t.lr_scheduler_kwargs)
        if "gradient_accumulation_steps" in changes or "per_device_train_batch_size" in changes:
            auto = self.replan(
                checked.get("per_device_train_batch_size", tr.plan.batch_size),
                checked.get("gradient_accumulation_steps", tr.plan.accumulation),
            )
        if "optim" in changes:
            self._swap_optimizer(
                t.optim,
                checked["optim"],
                checked.get("weight_decay", t.weight_decay),
                checked.get("learning_rate", t.learning_rate),
            )
        if "weight_decay" in changes:
            optim.set_weight_decay(tr.optimizer, checked["weight_decay"])
        for k, v in checked.items():
            setattr(t, k, v)
        if autopilot.KEY in changes:
            tr.autopilot.configure(t.autopilot)
        return changes, auto

    def replan(self, batch_size: int, accumulation: int) -> dict[str, list[Any]]:
        """New micro-batch size and accumulation from the next step; the steps left are recounted and
        the schedule re-anchored where their count changed. Returns the change of ``total_steps``."""
        tr = self.trainer
        assert tr.plan is not None
        plan, before = tr.plan, tr.plan.total_steps
        if batch_size * accumulation == plan.batch_size * plan.accumulation:
            plan.rebatch(batch_size, accumulation)  # the same effective batch: the same steps
        else:
            plan.set_batch_size(batch_size)
            plan.set_accumulation(accumulation)
        if plan.total_steps == before:
            return {}
        tr.schedule.respread(plan.total_steps - plan.step)
        return {"total_steps": [before, plan.total_steps]}

    def _swap_optimizer(self, old: str, new: str, weight_decay: float, lr: float) -> None:
        tr = self.trainer
        actual = optim.actual_name
        tr.optimizer, carried = optim.swap(
            tr.optimizer, actual(old, tr.device), actual(new, tr.device), tr.cfg.train, weight_decay
        )
        notes, advice = [], ""
        if not carried and tr.step:
            notes.append("optimizer state starts fresh (moments carry over only between fp32 Adam variants)")
        off = optim.lr_out_of_range(new, lr)
        if off is not None:
            notes.append(off)
            lo, hi = optim.USUAL_LR[new]
            advice = f"set learning_rate between {lo:g} and {hi:g}; find_lr measures it for this model"
        if notes:
            tr.emit(
                WarningEvent(message=f"{old} -> {new}: " + "; ".join(notes), kind="config", advice=advice)
            )
