"""Where a run stands in its data and its optimizer steps, and how many steps are left.

The data is a stream of examples, epoch after epoch, each epoch in its own shuffled order. A
micro-batch takes the next ``batch_size`` examples of the current epoch (fewer at an epoch's end, as
a DataLoader without ``drop_last``); an optimizer step takes the next ``accumulation`` micro-batches.
The position is kept in examples, so a new micro-batch size mid-run skips and repeats nothing.

The budget follows HF: ``max_steps`` > 0 fixes the micro-batches (``max_steps x accumulation`` as
planned at the start); otherwise ``num_train_epochs`` fixes the examples (a fractional last epoch
rounded up to whole micro-batches). Either way, a new accumulation or batch size recounts the steps
left from the data left, so the run still sees the data it planned to.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Slice:
    """One micro-batch: positions ``start:stop`` of epoch ``epoch``'s order."""

    epoch: int
    start: int
    stop: int


@dataclass
class StepPlan:
    examples: int  # train examples in one epoch
    batch_size: int  # examples per micro-batch
    accumulation: int  # micro-batches per optimizer step
    total_steps: int
    step: int = 0  # optimizer steps taken
    seen: int = 0  # examples consumed, all epochs together
    end: int | None = None  # epochs budget: the examples to consume in all
    micro_left: int | None = None  # steps budget: the micro-batches left

    @classmethod
    def create(
        cls, examples: int, batch_size: int, accumulation: int, num_train_epochs: float, max_steps: int
    ) -> StepPlan:
        if examples < 1:
            raise ValueError("a plan needs at least one training example")
        if max_steps > 0:
            return cls(examples, batch_size, accumulation, max_steps, micro_left=max_steps * accumulation)
        per_epoch = math.ceil(examples / batch_size)
        full, part = divmod(math.ceil(num_train_epochs * per_epoch), per_epoch)
        plan = cls(examples, batch_size, accumulation, 0, end=full * examples + part * batch_size)
        plan.total_steps = plan.steps_left()
        return plan

    # ------------------------------------------------------------ counting

    @property
    def epoch(self) -> float:
        """Epochs done, as HF reports them (fractional)."""
        return self.seen / self.examples

    def micro_batches_left(self) -> int:
        if self.micro_left is not None:
            return self.micro_left
        assert self.end is not None
        count, pos = 0, self.seen
        while pos < self.end:
            stop = min((pos // self.examples + 1) * self.examples, self.end)
            count += math.ceil((stop - pos) / self.batch_size)
            pos = stop
        return count

    def steps_left(self) -> int:
        return math.ceil(self.micro_batches_left() / self.accumulation)

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    # ------------------------------------------------------------ consuming

    def next_step(self) -> list[Slice]:
        """The micro-batches of the next optimizer step, consumed (``step`` moves on in ``finish_step``)."""
        n = min(self.accumulation, self.micro_batches_left()) or self.accumulation
        out = []
        for _ in range(n):
            epoch, offset = divmod(self.seen, self.examples)
            take = min(self.batch_size, self.examples - offset)
            if self.end is not None:
                take = max(1, min(take, self.end - self.seen))
            out.append(Slice(epoch, offset, offset + take))
            self.seen += take
            if self.micro_left is not None:
                self.micro_left = max(0, self.micro_left - 1)
        return out

    def finish_step(self) -> None:
        self.step += 1

    # ------------------------------------------------------------ live changes

    def set_accumulation(self, accumulation: int) -> dict[str, list[int]]:
        """Recount the steps left; returns the change of ``total_steps`` (empty when none)."""
        self.accumulation = accumulation
        return self._recount()

    def set_batch_size(self, batch_size: int) -> dict[str, list[int]]:
        """A new micro-batch from the next step on. Under ``max_steps`` the micro-batches left stay (each
        is larger or smaller); under epochs the data left stays and the steps are recounted."""
        self.batch_size = batch_size
        return self._recount()

    def _recount(self) -> dict[str, list[int]]:
        old = self.total_steps
        self.total_steps = self.step + max(1, self.steps_left())
        return {"total_steps": [old, self.total_steps]} if old != self.total_steps else {}

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> StepPlan:
        return cls(**{k: state[k] for k in cls.__dataclass_fields__ if k in state})

    @classmethod
    def from_micro_count(cls, fresh: StepPlan, state: dict[str, Any]) -> StepPlan:
        """A plan from a checkpoint of version 0.1, which counted micro-batches (``micro``,
        ``total_micro``) at a batch size that never changed: replay that many micro-batches."""
        plan = cls.from_state(fresh.state_dict())
        plan.accumulation = 1
        for _ in range(int(state["micro"])):
            plan.next_step()
        plan.accumulation = int(state["gradient_accumulation_steps"])
        if plan.micro_left is not None:
            plan.micro_left = int(state["total_micro"]) - int(state["micro"])
        plan.step, plan.total_steps = int(state["step"]), int(state["total_steps"])
        return plan
