"""One process of a test run on several processes, started by torchrun from tests/engine/test_distributed.py:
``torchrun --standalone --nproc-per-node 2 tests/engine/dist_worker.py SPEC.json``.

Runs the spec's scenarios one after another in the same process group (the imports and the group are
paid once), each a real ``Trainer`` with ``dist``; like ``helpers.run``, rank 0 queues a scenario's
commands when step n is reported, so they apply before step n+1 on every process. Each scenario writes
into its ``root``: ``events.jsonl`` (rank 0's events), ``rank<r>.safetensors`` (that process's trainable
parameters, whole under DDP; rank 0's gathered copy under FSDP) and ``rank<r>.json`` (its end status and
its RNG state's digest); its run folder is ``runs/run``. ``resume_from`` resumes a copy of that checkpoint
(with ``resume_set`` overrides). A scenario with ``oom_rank`` makes that process run out of memory at step
``oom_step`` (an injected ``torch.OutOfMemoryError``); it must come last, as the run then ends on all.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from tests.engine.helpers import make_cfg  # noqa: E402
from tunedeck.engine import checkpoint, distributed  # noqa: E402
from tunedeck.engine import config as config_mod  # noqa: E402
from tunedeck.engine import resume as resume_mod  # noqa: E402
from tunedeck.engine.protocol import Cancel, Event, StepEvent, command_from_dict  # noqa: E402
from tunedeck.engine.trainer import Trainer  # noqa: E402


def run_scenario(spec: dict) -> None:
    root = Path(spec["root"])
    cfg = make_cfg(root, train__run_name="run", **spec.get("cfg", {}))
    dist = distributed.Dist.from_env(cfg.train.distributed)
    at = {int(k): [command_from_dict(c) for c in v] for k, v in spec.get("at", {}).items()}
    events: list[Event] = []
    commands: queue.Queue = queue.Queue()
    cancel = threading.Event()

    def put(step: int) -> None:
        for c in at.pop(step, []):  # once: a rollback reports a step again
            if isinstance(c, Cancel):
                cancel.set()  # as TrainingSession.send does
            commands.put(c)

    def emit(e: Event) -> None:
        events.append(e)
        if dist.is_main and isinstance(e, StepEvent):
            put(e.step)

    if dist.is_main:
        put(0)
    resume = None
    if spec.get("resume_from"):
        # A copy outside its run's checkpoints/: the resumed run gets a folder of its own.
        start = root / "start"
        if dist.is_main:
            shutil.copytree(spec["resume_from"], start)
        torch.distributed.barrier()
        # As tunedeck-train --resume START --set ... does: the checkpoint's config with those values.
        asked = config_mod.apply_overrides(checkpoint.open_resume(start).cfg, spec.get("resume_set", []))
        cfg, resume = resume_mod.prepare(start, asked)
    trainer = Trainer(cfg, emit, commands, resume, cancel=cancel, dist=dist)
    if spec.get("oom_rank") == dist.rank:
        to_device = trainer._to_device

        def failing(batch: dict) -> dict:
            if trainer.step + 1 == spec["oom_step"]:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
            return to_device(batch)

        trainer._to_device = failing  # type: ignore[method-assign]
    end = trainer.run()
    events.append(end)
    if dist.is_main:
        with open(root / "events.jsonl", "w") as f:
            for e in events:
                f.write(json.dumps(e.to_dict(), default=str) + "\n")
    if end.status == "failed":
        # As tunedeck-train does: leave the error for rank 0, and end this process.
        error = [e for e in events if e.type == "error"][-1]
        dist.report_failure(error.message, error.kind, error.advice)  # type: ignore[attr-defined]
        sys.stdout.flush()
        os._exit(1)
    state = distributed_params(trainer, dist)
    if state is not None:
        save_file(state, str(root / f"rank{dist.rank}.safetensors"))
    digest = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
    (root / f"rank{dist.rank}.json").write_text(json.dumps({"status": end.status, "rng": digest}))


def distributed_params(trainer: Trainer, dist: distributed.Dist) -> dict[str, torch.Tensor] | None:
    """The trainable parameters by name: this process's own under DDP, the gathered whole on rank 0 under
    FSDP2 (None on the others)."""
    if dist.shards:
        full = dist.model_state(trainer.model, trainable_only=True)
        return {k: v.contiguous() for k, v in full.items()} if dist.is_main and full else None
    return {
        n: p.detach().clone().contiguous() for n, p in trainer.model.named_parameters() if p.requires_grad
    }


def main() -> None:
    torch.set_num_threads(1)
    spec = json.loads(Path(sys.argv[1]).read_text())
    for scenario in spec["scenarios"]:
        run_scenario(scenario)
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
