"""The course's QLoRA preset on the CPU: losses, step time, peak RSS, and 4-bit against fp32 memory.

python -m bench.qlora_cpu [--model builtin:tiny | --llama HIDDEN:LAYERS] [--steps N] [--fp32] [--threads N]

One variant per process, so the peak RSS (``ru_maxrss``) is that run's alone: run it once with and
once without ``--fp32``. ``--llama 768:12`` builds a random-initialised Llama of that width and
depth offline (the builtin tokenizer, ~85M parameters at 768:12) for memory figures at a size where
the weights, not the Python process, dominate. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import resource
import statistics
import tempfile
from pathlib import Path

import psutil
import torch

from tunedeck.engine import builtin
from tunedeck.engine import config as config_mod
from tunedeck.engine.session import TrainingSession

PRESET = builtin.RESOURCES / "presets" / "course-qlora.yaml"


def build_llama(folder: Path, hidden: int, layers: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = builtin.build_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="builtin:tiny")
    p.add_argument("--llama", metavar="HIDDEN:LAYERS")
    p.add_argument("--steps", type=int, default=-1, help="-1: the preset's one epoch")
    p.add_argument("--fp32", action="store_true", help="the same run with an fp32 base (no 4-bit)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if args.llama:
            hidden, layers = (int(x) for x in args.llama.split(":"))
            model = str(build_llama(Path(tmp) / "llama", hidden, layers))
        sets = [
            f"model.name_or_path={model}",
            f"train.output_dir={tmp}/runs",
            f"train.max_steps={args.steps}",
            f"model.load_in_4bit={not args.fp32}",
        ]
        cfg = config_mod.apply_overrides(config_mod.load(PRESET), sets)
        session = TrainingSession(cfg, system_interval=0)
        session.start()
        session.join()
        events = session.drain()
        sampler = session.sampler()  # the trained model, kept after the run
        base = sampler.model.get_base_model() if sampler is not None else None
    gc.collect()
    # glibc keeps freed blocks (the fp32 weights a 4-bit load quantised) mapped; give them back first,
    # so the figure is what the process holds.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss_end = psutil.Process().memory_info().rss
    steps = [e for e in events if e.type == "step"]
    evals = [e for e in events if e.type == "eval"]
    errors = [e.message for e in events if e.type == "error"]
    start = next(e for e in events if e.type == "start")
    times = [e.step_time_s for e in steps[1:]]  # the first step warms up
    print(
        json.dumps(
            {
                "model": args.llama or args.model,
                "base": "fp32" if args.fp32 else "4-bit nf4 (double quant)",
                "params_total": start.model["params_total"],
                "params_trainable": start.model["params_trainable"],
                "threads": start.model.get("threads"),
                "weights_mb": round(base.get_memory_footprint() / 2**20, 2) if base is not None else None,
                "steps": len(steps),
                "loss_first_10": round(statistics.fmean(e.loss for e in steps[:10]), 4),
                "loss_last_10": round(statistics.fmean(e.loss for e in steps[-10:]), 4),
                "eval_loss": [(e.step, round(e.eval_loss, 4)) for e in evals],
                "step_time_median_ms": round(1000 * statistics.median(times), 1) if times else None,
                "tokens_per_s_median": round(statistics.median(e.tokens_per_s for e in steps[1:]), 1)
                if len(steps) > 1
                else None,
                # The peak includes loading, when the fp32 checkpoint and its quantised copy meet. At
                # the end, with the trained model still held: all resident pages, and the anonymous
                # ones alone (RssAnon). The difference is mostly the checkpoint file's pages, mapped by
                # safetensors: the fp32 base reads its weights from them, the 4-bit one read them once
                # to quantise (the kernel drops such clean pages when memory runs short).
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "rss_end_mb": round(rss_end / 2**20, 1),
                "rss_anon_end_mb": round(_status_kb("RssAnon") / 1024, 1),
                "errors": errors,
            }
        )
    )


if __name__ == "__main__":
    main()
