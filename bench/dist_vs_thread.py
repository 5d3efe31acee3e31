"""The same LoRA job in one process (``tunedeck-train``, the run in a thread) and under torchrun
(``tunedeck-train --nproc-per-node N``), each a fresh command, timed from its own step events.

    python -m bench.dist_vs_thread --mode cpu|gpu [--nproc N] [--steps S] [--warmup W] [--repeats R]

The job is bench.vs_trainer's ``fixed`` one: ``--batch`` rows of ``--seq-len`` random ids per optimizer
step, every token a target, LoRA r 32 on q/k/v/o without dropout, adamw_torch, lr 1e-4 cosine, eval
and checkpoints off. GPU mode: the Llama-3.2-1B-shaped model in bf16; CPU mode: ``builtin:tiny`` in fp32. With N
processes each takes ``batch / N`` rows of every step (the same examples make each step), so the losses
of both sides must agree: with one process bit for bit (the engine's distributed hooks do nothing
there), with several within fp32 rounding. The runs alternate, thread then torchrun, then torchrun then
thread, so a drift of the machine favours neither. Timed: ``--steps`` steps after ``--warmup``, from
the ``step_time_s`` and ``tokens`` of each step event (rank 0's clock, every process's tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.vs_trainer import LORA, LR, make_rows


def config(model: str, data: Path, out: Path, args: argparse.Namespace, per_device: int) -> dict[str, Any]:
    return {
        "model": {"name_or_path": model, "dtype": "auto", "attn_implementation": "sdpa"},
        # No dropout: with several processes each draws its own masks, which would hide the comparison.
        "lora": {"enabled": True, **LORA, "dropout": 0.0},
        "data": {"path": str(data), "format": "tokenized", "max_length": args.seq_len, "eval_fraction": 0.0},
        "train": {
            "learning_rate": LR,
            "lr_scheduler_type": "cosine",
            "warmup_ratio": 0.0,
            "optim": "adamw_torch",
            "per_device_train_batch_size": per_device,
            "max_steps": args.warmup + args.steps,
            "eval_steps": 0,
            "save_steps": 0,
            "logging_steps": 1,
            "output_dir": str(out),
        },
    }


def run_side(side: str, cfg_file: Path, out: Path, nproc: int, timeout: float) -> list[dict]:
    """One fresh ``tunedeck-train``; its step events."""
    name = f"{side}-{len(list(out.glob(side + '-*')))}"
    cmd = [
        sys.executable,
        "-m",
        "tunedeck.engine.cli",
        str(cfg_file),
        "--quiet",
        "--set",
        f"train.run_name={name}",
    ]
    if side != "thread":
        cmd += ["--nproc-per-node", str(nproc)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    lines = (out / name / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["type"] == "step"]


def timing(steps: list[dict], warmup: int) -> dict[str, float]:
    timed = [e for e in steps if e["step"] > warmup]
    seconds = sum(e["step_time_s"] for e in timed)
    return {
        "tokens_per_s": sum(e["tokens"] for e in timed) / seconds,
        "step_time_ms": 1000 * statistics.median(e["step_time_s"] for e in timed),
        "mem_peak_mb": max(e["mem_peak_mb"] for e in timed),
        "last_loss": steps[-1]["loss"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--nproc", type=int, default=1, help="processes of the torchrun side")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--repeats", type=int, default=1, help="pairs of runs (thread, torchrun), order alternating"
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="default: 1024 on the GPU, 256 on the CPU")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    args.seq_len = args.seq_len or (1024 if args.mode == "gpu" else 256)
    if args.batch % args.nproc:
        p.error(f"--batch {args.batch} does not split over --nproc {args.nproc}")
    if args.mode == "gpu":
        from bench.vs_trainer import llama_1b_dir

        model, vocab = str(llama_1b_dir()), 128256
    else:
        from tunedeck.engine import builtin

        model, vocab = "builtin:tiny", builtin.build_tokenizer().vocab_size
    tmp = Path(tempfile.mkdtemp(prefix="tunedeck-dist-bench-"))
    data = tmp / "fixed.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for row in make_rows("fixed", (args.warmup + args.steps) * args.batch, vocab, args.seq_len, 0):
            f.write(json.dumps(row) + "\n")
    files = {}
    for side, per_device in (("thread", args.batch), ("torchrun", args.batch // args.nproc)):
        files[side] = tmp / f"{side}.yaml"
        files[side].write_text(json.dumps(config(model, data, tmp / "runs", args, per_device)))
    results: dict[str, list[dict[str, float]]] = {"thread": [], "torchrun": []}
    for r in range(args.repeats):
        for side in ("thread", "torchrun") if r % 2 == 0 else ("torchrun", "thread"):
            steps = run_side(side, files[side], tmp / "runs", args.nproc, args.timeout)
            results[side].append(timing(steps, args.warmup))
            print(
                f"{side:9s} run {r}: " + ", ".join(f"{k} {v:,.4g}" for k, v in results[side][-1].items()),
                flush=True,
            )
    summary = {
        side: {k: statistics.median(x[k] for x in runs) for k in runs[0]} for side, runs in results.items()
    }
    a, b = summary["thread"], summary["torchrun"]
    print(
        f"\n{args.mode}, {args.batch} x {args.seq_len} tokens per step, {args.steps} steps timed after {args.warmup}:\n"
        f"  one process, a thread:       {a['tokens_per_s']:10,.0f} tokens/s  {a['step_time_ms']:8.1f} ms/step\n"
        f"  torchrun, {args.nproc} process(es):      {b['tokens_per_s']:10,.0f} tokens/s  {b['step_time_ms']:8.1f} ms/step"
        f"  ({b['tokens_per_s'] / a['tokens_per_s']:.2f}x)\n"
        f"  last loss: {a['last_loss']!r} vs {b['last_loss']!r}"
        + (
            " (equal)"
            if a["last_loss"] == b["last_loss"]
            else f" (differ by {abs(a['last_loss'] - b['last_loss']):.2e})"
        )
    )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"args": vars(args), "runs": results, "summary": summary}, indent=1)
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
