"""Print the figures of out-of-memory healing and of the learning-rate range test's restore.

python -m bench.self_care

Both on the CPU in fp32 with builtin:tiny and make_cfg's settings (batch 4, lr 3e-3, linear).
Healing: TUNEDECK_FAULT_OOM_TOKENS makes the micro-batches over a token count raise a real
torch.OutOfMemoryError; the healed run is compared with the same change made by hand at that step,
with the unhealed run, and with a run at the smaller batch from the start.
Restore: a run with two finds in it (one before the first step, one while paused) against the same
run without.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from tests.engine.helpers import make_cfg, of, run, steps
from tunedeck.engine import oom
from tunedeck.engine.protocol import FindLR, Pause, Resume, Set


def _weights(trainer: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def _diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def healing(tmp: Path) -> None:
    kw: dict[str, Any] = dict(train__max_steps=8, lora__dropout=0.0)
    os.environ[oom.FAULT_ENV] = "100"
    try:
        healed_ev, healed = run(make_cfg(tmp / "healed", **kw))
    finally:
        del os.environ[oom.FAULT_ENV]
    same = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}
    _, by_hand = run(make_cfg(tmp / "hand", **kw), at={4: [Set(same)]})
    plain_ev, plain = run(make_cfg(tmp / "plain", **kw))
    _, small = run(make_cfg(tmp / "small", **kw, **{f"train__{k}": v for k, v in same.items()}))
    print(f"out of memory healed ({oom.FAULT_ENV}=100, 8 steps, no dropout):")
    for c in of(healed_ev, "change"):
        print(f"  change after step {c.step} ({c.source}): {c.changes}")
        print(f"    reason: {c.reason}")
    h, p = steps(healed_ev), steps(plain_ev)
    print(
        f"  steps reported: {sorted(h)}; accumulation per step: {[h[s].gradient_accumulation_steps for s in h]}"
    )
    print(f"  examples seen: healed {healed.plan.seen}, unhealed {plain.plan.seen}")
    print(f"  max |loss diff| vs unhealed: {max(abs(h[s].loss - p[s].loss) for s in h):.2e}")
    w = _weights(healed)
    print(f"  max |weight diff| vs the same change made by hand at step 4: {_diff(w, _weights(by_hand)):.2e}")
    print(
        f"  max |weight diff| vs the unhealed run (batch 4 x 1 throughout): {_diff(w, _weights(plain)):.2e}"
    )
    print(f"  max |weight diff| vs a run at batch 2 x 2 from the start: {_diff(w, _weights(small)):.2e}")

    kw = dict(train__max_steps=4, lora__dropout=0.1)
    os.environ[oom.FAULT_ENV] = "90"
    try:
        first_ev, first = run(
            make_cfg(
                tmp / "first",
                **kw,
                train__per_device_train_batch_size=4,
                train__gradient_accumulation_steps=2,
            )
        )
    finally:
        del os.environ[oom.FAULT_ENV]
    _, fresh = run(
        make_cfg(
            tmp / "fresh", **kw, train__per_device_train_batch_size=2, train__gradient_accumulation_steps=4
        )
    )
    (c,) = of(first_ev, "change")
    print(f"out of memory in the 2nd micro-batch of step 1 ({oom.FAULT_ENV}=90, dropout 0.1): {c.changes}")
    print(
        f"  max |weight diff| vs a run at batch 2 x 4 from the start: {_diff(_weights(first), _weights(fresh)):.2e}"
    )


def restore(tmp: Path) -> None:
    kw: dict[str, Any] = dict(train__max_steps=6, lora__dropout=0.1)
    plain_ev, plain = run(make_cfg(tmp / "plain", **kw))
    found_ev, found = run(
        make_cfg(tmp / "found", **kw),
        at={0: [FindLR(steps=20)], 3: [Pause(), FindLR(start_lr=1e-5, end_lr=1e-1, steps=20), Resume()]},
    )
    a, b = steps(plain_ev), steps(found_ev)
    finds = of(found_ev, "lr_find")
    print("find_lr restore (6 steps, dropout 0.1; finds of 20 steps before step 1 and after step 3):")
    for f in finds:
        suggestion = f"{f.suggestion:.2e}" if f.suggestion is not None else "none"
        print(f"  find at step {f.step}: {len(f.lrs)} steps, {f.stopped}, suggestion {suggestion}")
    print(f"  losses equal: {[a[s].loss for s in a] == [b[s].loss for s in b]}")
    print(f"  max |weight diff| vs the run without: {_diff(_weights(plain), _weights(found)):.2e}")
    print(f"  data position equal: {plain.plan.state_dict() == found.plan.state_dict()}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        healing(Path(tmp) / "heal")
        restore(Path(tmp) / "restore")


if __name__ == "__main__":
    main()
