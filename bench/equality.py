"""Print the engine's equality figures: accumulation vs a bigger batch, resume vs uninterrupted,
rollback vs no rollback, rollback with a new LR vs a resume with that LR.

python -m bench.equality
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from tests.engine.helpers import make_cfg, of, run, steps
from tunedeck.engine import checkpoint
from tunedeck.engine import config as config_mod
from tunedeck.engine.protocol import Rollback, Set


def accumulation(tmp: Path) -> None:
    a_ev, a = run(
        make_cfg(
            tmp / "a",
            train__per_device_train_batch_size=8,
            train__gradient_accumulation_steps=1,
            train__max_steps=4,
            train__optim="sgd",
        )
    )
    b_ev, b = run(
        make_cfg(
            tmp / "b",
            train__per_device_train_batch_size=2,
            train__gradient_accumulation_steps=4,
            train__max_steps=4,
            train__optim="sgd",
        )
    )
    la, lb = [e.loss for e in of(a_ev, "step")], [e.loss for e in of(b_ev, "step")]
    ga, gb = [e.grad_norm for e in of(a_ev, "step")], [e.grad_norm for e in of(b_ev, "step")]
    pa = dict(a.model.named_parameters())
    worst_w = max(
        float((p.detach() - pa[n].detach()).abs().max())
        for n, p in b.model.named_parameters()
        if p.requires_grad
    )
    print("accumulation: batch 8 x accum 1 vs batch 2 x accum 4, 4 steps, fp32 CPU")
    for i, (x, y) in enumerate(zip(la, lb), 1):
        print(f"  step {i}: loss {x:.7f} vs {y:.7f}  grad_norm {ga[i - 1]:.7f} vs {gb[i - 1]:.7f}")
    print(
        f"  max |loss diff| {max(abs(x - y) for x, y in zip(la, lb)):.2e}, "
        f"max rel grad-norm diff {max(abs(x - y) / x for x, y in zip(ga, gb)):.2e}, "
        f"max |weight diff| after 4 steps {worst_w:.2e}"
    )


def resume(tmp: Path) -> None:
    kw = dict(
        train__max_steps=10, lora__dropout=0.1, train__lr_scheduler_type="cosine", train__warmup_steps=2
    )
    at = {2: [Set({"learning_rate": 1e-3})]}
    full, _ = run(make_cfg(tmp / "full", **kw), at=at)
    _, part = run(make_cfg(tmp / "part", train__save_steps=5, **kw), at=at)
    resumed, _ = run(None, resume_from=part.run_dir / "checkpoints" / "step-000005")
    a, b = steps(full), steps(resumed)
    print(
        "resume: 10 steps, dropout 0.1, LR changed live at step 2, checkpoint at 5, resumed in a new Trainer"
    )
    for s in sorted(b):
        print(
            f"  step {s}: uninterrupted {a[s].loss:.7f}  resumed {b[s].loss:.7f}  lr {a[s].learning_rate:.3e} "
            f"vs {b[s].learning_rate:.3e}"
        )
    print(f"  max |loss diff| {max(abs(a[s].loss - b[s].loss) for s in b):.1e}")


def _weight_diff(a: torch.nn.Module, b: torch.nn.Module) -> tuple[float, bool]:
    pa = dict(a.named_parameters())
    pairs = [(p.detach(), pa[n].detach()) for n, p in b.named_parameters() if p.requires_grad]
    return max(float((x - y).abs().max()) for x, y in pairs), all(torch.equal(x, y) for x, y in pairs)


def rollback(tmp: Path) -> None:
    kw = dict(
        train__max_steps=12,
        train__save_steps=4,
        lora__dropout=0.1,
        train__lr_scheduler_type="cosine",
        train__warmup_steps=2,
    )
    full, a = run(make_cfg(tmp / "plain", **kw))
    rolled, b = run(make_cfg(tmp / "rolled", **kw), at={10: [Rollback("step-000004")]})
    ref = steps(full)
    again = of(rolled, "step")[10:]
    worst, equal = _weight_diff(a.model, b.model)
    print("rollback: 12 steps, dropout 0.1, cosine with warm-up; at step 10 back to step-000004, no change")
    for e in again:
        print(f"  step {e.step}: no rollback {ref[e.step].loss:.7f}  after rollback {e.loss:.7f}")
    print(
        f"  max |loss diff| {max(abs(ref[e.step].loss - e.loss) for e in again):.1e}, "
        f"max |weight diff| at the end {worst:.1e}, bit-equal weights: {equal}"
    )
    rolled, b = run(
        make_cfg(tmp / "rolled-lr", **kw), at={10: [Rollback("step-000004", {"learning_rate": 1e-3})]}
    )
    ckpt = b.run_dir / "checkpoints" / "step-000004"
    asked = config_mod.apply_overrides(checkpoint.read_config(ckpt), ["train.learning_rate=1e-3"])
    resumed, c = run(asked, resume_from=ckpt)
    r = steps(resumed)
    again = of(rolled, "step")[10:]
    worst, equal = _weight_diff(c.model, b.model)
    print("rollback with learning_rate 1e-3 vs resume of step-000004 with --set train.learning_rate=1e-3")
    for e in again:
        print(
            f"  step {e.step}: resumed {r[e.step].loss:.7f}  rolled back {e.loss:.7f}  lr {e.learning_rate:.3e}"
        )
    print(
        f"  max |loss diff| {max(abs(r[e.step].loss - e.loss) for e in again):.1e}, "
        f"max |weight diff| at the end {worst:.1e}, bit-equal weights: {equal}"
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        accumulation(Path(d))
        resume(Path(d))
        rollback(Path(d))
