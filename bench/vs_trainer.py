"""Tunedeck's engine against plain ``transformers.Trainer`` + peft on the same LoRA job.

    python -m bench.vs_trainer --mode cpu|gpu --job fixed|variable|all [--steps N] [--warmup N]
                               [--repeats R] [--monitoring] [--variant NAME:KEY=VALUE,...] [--out results.json]

Both sides get the same model folder, LoRA settings (r 32, alpha 64, dropout 0.1 on q, k, v, o),
data in the same order, batch, sequence lengths, optimizer (adamw_torch), schedule (lr 1e-4 cosine,
no warm-up), gradient clipping 1.0, seed, and bf16 on the GPU. (a) is Trainer configured as a user
would: a padding collator (``DataCollatorForSeq2Seq``), logging every step, nothing saved, no
length grouping. (b) is the engine headless through ``TrainingSession`` with its monitoring on
(a step event per step written to metrics.jsonl, the ~1 Hz system sampler). The runs alternate
in this one process, a, b then b, a (and so on), so a drift over its life favours neither side;
each one is timed over ``--steps`` optimizer steps after ``--warmup`` steps, counting real (non-pad) tokens only, and its peak allocated memory is read from
the CUDA allocator (reset before each run; on the CPU: the peak of the process RSS above its level
at the start of the run, sampled at 50 Hz). ``--monitoring`` also times the engine with its
monitoring off (no system sampler, step events only at the edges of the timed window).

Jobs: ``fixed`` is batch 8 x 1024 random tokens, every token a target; ``variable`` is 8
instruction-style examples per step with lengths uniform in 64..1024 and the loss on the answer
only, which the engine packs padding-free (``data.packing``) and Trainer pads to the longest in
its batch. GPU mode: a Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32 heads, 8 kv heads,
vocab 128256, tied embeddings), random init, bf16, written once to the cache folder. CPU mode:
``builtin:tiny`` in fp32, same shapes unless ``--seq-len``/``--min-len`` say otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

LORA = {"r": 32, "alpha": 64, "dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
SEED = 42
LR = 1e-4
IGNORE = -100
FIRST_ID = 3  # ids 0..2 are the builtin tokenizer's <s>, </s>, <pad>


# ---------------------------------------------------------------- model and data


def llama_1b_dir() -> Path:
    """A Llama-3.2-1B-shaped model folder, random init (seeded), bf16, with the builtin tokenizer."""
    from tunedeck.engine import builtin

    target = builtin.cache_dir() / "bench-llama-1b-shape-v1"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = builtin.build_tokenizer()
    cfg = LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    model = model.to(torch.bfloat16)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bench-1b-", dir=target.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del model
    try:
        tmp.rename(target)
    except OSError:  # another writer won
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def make_rows(job: str, n: int, vocab: int, seq_len: int, min_len: int, seed: int = 0) -> list[dict]:
    """``fixed``: n rows of seq_len random ids, all targets. ``variable``: lengths uniform in
    min_len..seq_len, a prompt of 20-60% of the length without loss, then the answer."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = seq_len if job == "fixed" else rng.randint(min_len, seq_len)
        ids = [rng.randrange(FIRST_ID, vocab) for _ in range(length)]
        if job == "fixed":
            labels = list(ids)
        else:
            prompt = rng.randint(int(0.2 * length), int(0.6 * length))
            labels = [IGNORE] * prompt + ids[prompt:]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def engine_order(n: int, seed: int = SEED) -> list[int]:
    """The engine's example order in epoch 0 (``tunedeck.engine.trainer.Trainer._order``); Trainer is fed the
    data in this order with a sequential sampler, so both see the same batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


# ---------------------------------------------------------------- measuring


@dataclass
class Result:
    side: str  # trainer | engine | engine-monitoring-off
    job: str
    repeat: int
    tokens: int  # real tokens in the timed steps
    seconds: float
    tokens_per_s: float
    peak_mb: float | None  # CUDA: max allocated; CPU: peak RSS above the start of the run
    first_loss: float | None
    info: dict[str, Any] = field(default_factory=dict)


class RssPeak:
    """Samples the process RSS at 50 Hz; ``peak_mb`` is the highest reading above the first."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.start_rss = self.proc.memory_info().rss
        self.peak = self.start_rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return (self.peak - self.start_rss) / 2**20


def _clean(device: torch.device) -> None:
    gc.collect()
    if sys.platform.startswith("linux"):  # hand freed heap back, so the next run's RSS starts low
        import ctypes

        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- (a) transformers.Trainer + peft


def run_trainer(job: Job, repeat: int) -> Result:
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    device = job.device
    _clean(device)
    rss = RssPeak() if device.type == "cpu" else None
    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(job.model_dir)
    model = AutoModelForCausalLM.from_pretrained(job.model_dir, dtype=job.dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=LORA["target_modules"],
            task_type="CAUSAL_LM",
        ),
    )
    dataset = [
        {"input_ids": r["input_ids"], "attention_mask": [1] * len(r["input_ids"]), "labels": r["labels"]}
        for r in (job.rows[j] for j in job.order)
    ]
    total = job.warmup + job.steps
    kw: dict[str, Any] = dict(
        output_dir=str(job.tmp / f"trainer-{repeat}"),
        per_device_train_batch_size=job.batch,
        gradient_accumulation_steps=1,
        max_steps=total,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=job.gpu,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        seed=SEED,
        disable_tqdm=True,
        use_cpu=not job.gpu,
    )
    fields = TrainingArguments.__dataclass_fields__
    if "train_sampling_strategy" in fields:
        kw["train_sampling_strategy"] = "sequential"
    if "group_by_length" in fields:
        kw["group_by_length"] = False
    args = TrainingArguments(**kw)
    marks: dict[int, float] = {}
    edges = (job.warmup, total)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in edges:
                _sync(device)
                marks[state.global_step] = time.perf_counter()

    losses: list[torch.Tensor] = []

    def first_loss(module, inputs, output):
        if not losses and getattr(output, "loss", None) is not None:
            losses.append(output.loss.detach())

    hook = model.register_forward_hook(first_loss)
    cls = Trainer
    if "train_sampling_strategy" not in fields:  # older transformers: same order by a sequential sampler

        class SequentialTrainer(Trainer):
            def _get_train_sampler(self, *a, **k):
                return torch.utils.data.SequentialSampler(self.train_dataset)

        cls = SequentialTrainer
    trainer = cls(
        model=model,
        args=args,
        train_dataset=dataset,
        callbacks=[Clock()],
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE),
    )
    trainer.train()
    _sync(device)
    hook.remove()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss.stop()
    seconds = marks[total] - marks[job.warmup]
    tokens = job.timed_tokens()
    loss0 = float(losses[0]) if losses else None
    del trainer, model, hook
    _clean(device)
    return Result(
        "trainer",
        job.name,
        repeat,
        tokens,
        seconds,
        tokens / seconds,
        peak,
        loss0,
        {"optim": "adamw_torch", "attention": "sdpa", "collator": "DataCollatorForSeq2Seq"},
    )


# ---------------------------------------------------------------- (b) the engine


def run_engine(
    job: Job, repeat: int, monitoring: bool = True, variant: tuple[str, list[str]] | None = None
) -> Result:
    from tunedeck.engine import config as config_mod
    from tunedeck.engine.protocol import EndEvent, ErrorEvent, StartEvent, StepEvent, SystemEvent
    from tunedeck.engine.session import TrainingSession

    device = job.device
    _clean(device)
    rss = RssPeak() if device.type == "cpu" else None
    total = job.warmup + job.steps
    # Monitoring off: no sampler, step events only at the edges of the timed window (and the end).
    logging_steps = 1 if monitoring else math.gcd(job.warmup, job.steps)
    side = "engine" if monitoring else "engine-monitoring-off"
    if variant is not None:
        side = f"engine-{variant[0]}"
    cfg = config_mod.from_dict(
        {
            "model": {"name_or_path": str(job.model_dir), "dtype": "auto", "attn_implementation": "sdpa"},
            "lora": {"enabled": True, **LORA},
            "data": {
                "path": str(job.data_file),
                "format": "tokenized",
                "max_length": job.seq_len,
                "packing": job.name == "variable",
                "eval_fraction": 0.0,
            },
            "train": {
                "learning_rate": LR,
                "lr_scheduler_type": "cosine",
                "warmup_ratio": 0.0,
                "warmup_steps": 0,
                "optim": "adamw_torch",
                "per_device_train_batch_size": job.batch,
                "gradient_accumulation_steps": 1,
                "max_steps": total,
                "max_grad_norm": 1.0,
                "weight_decay": 0.0,
                "seed": SEED,
                "logging_steps": logging_steps,
                "eval_steps": 0,
                "save_steps": 0,
                "output_dir": str(job.tmp / f"{side}-{repeat}"),
                "use_liger_kernel": True,
            },
        }
    )
    # --engine-set changes every engine side; a --variant adds its own on top, as a side of its own.
    overrides = job.engine_set + (variant[1] if variant is not None else [])
    if overrides:
        cfg = config_mod.apply_overrides(cfg, overrides)
    session = TrainingSession(cfg, system_interval=1.0 if monitoring else 0)
    session.start()
    steps: dict[int, StepEvent] = {}
    errors, start, systems, end = [], None, 0, None
    while end is None:
        session.join(0.05)
        for e in session.drain():
            if isinstance(e, StepEvent):
                steps[e.step] = e
            elif isinstance(e, StartEvent):
                start = e
            elif isinstance(e, SystemEvent):
                systems += 1
            elif isinstance(e, ErrorEvent):
                errors.append(e.message)
            elif isinstance(e, EndEvent):
                end = e
    session.join()
    if end.status != "completed":
        raise RuntimeError(f"engine run failed: {'; '.join(errors) or end.status}")
    _sync(device)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss.stop()
    seconds = steps[total].elapsed_s - steps[job.warmup].elapsed_s
    tokens = job.timed_tokens()
    if monitoring:  # the engine's own count of real tokens must agree with the data: same batches
        counted = sum(steps[s].tokens for s in range(job.warmup + 1, total + 1))
        assert counted == tokens, f"engine counted {counted} real tokens, the data holds {tokens}"
    first = steps[1].loss if 1 in steps else None
    info = (
        {
            k: start.model.get(k)
            for k in ("dtype", "device", "liger", "liger_rope", "compiled", "attention", "optimizer")
        }
        if start
        else {}
    )
    info.update(system_events=systems, step_events=len(steps), logging_steps=logging_steps)
    del session
    _clean(device)
    return Result(side, job.name, repeat, tokens, seconds, tokens / seconds, peak, first, info)


# ---------------------------------------------------------------- the job


@dataclass
class Job:
    name: str
    gpu: bool
    model_dir: Path
    rows: list[dict]
    order: list[int]
    data_file: Path
    tmp: Path
    batch: int
    seq_len: int
    warmup: int
    steps: int
    engine_set: list[str] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if self.gpu else "cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.gpu else torch.float32

    def timed_tokens(self) -> int:
        lo, hi = self.warmup * self.batch, (self.warmup + self.steps) * self.batch
        return sum(len(self.rows[j]["input_ids"]) for j in self.order[lo:hi])


def make_job(name: str, args: argparse.Namespace, model_dir: Path, vocab: int, tmp: Path) -> Job:
    n = (args.warmup + args.steps) * args.batch
    rows = make_rows(name, n, vocab, args.seq_len, args.min_len)
    data_file = tmp / f"{name}.jsonl"
    with open(data_file, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return Job(
        name,
        args.mode == "gpu",
        model_dir,
        rows,
        engine_order(n),
        data_file,
        tmp,
        args.batch,
        args.seq_len,
        args.warmup,
        args.steps,
        list(args.engine_set),
    )


# ---------------------------------------------------------------- report


def _median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(results: list[Result]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for job in dict.fromkeys(r.job for r in results):
        rs = [r for r in results if r.job == job]
        sides = {}
        for side in dict.fromkeys(r.side for r in rs):
            mine = [r for r in rs if r.side == side]
            sides[side] = {
                "tokens_per_s": _median([r.tokens_per_s for r in mine]),
                "tokens_per_s_runs": [round(r.tokens_per_s, 1) for r in mine],
                "peak_mb": _median([r.peak_mb for r in mine]),
                "first_loss": mine[0].first_loss,
            }
        a, b = sides.get("trainer"), sides.get("engine")
        summary: dict[str, Any] = {"sides": sides}
        if a and b:
            summary["speed_ratio"] = b["tokens_per_s"] / a["tokens_per_s"]
            if a["peak_mb"] and b["peak_mb"] is not None:
                summary["memory_ratio"] = b["peak_mb"] / a["peak_mb"]
            if a["first_loss"] is not None and b["first_loss"] is not None:
                summary["first_loss_diff"] = abs(a["first_loss"] - b["first_loss"])
        if a:
            summary["variant_speed_ratio"] = {
                side: v["tokens_per_s"] / a["tokens_per_s"]
                for side, v in sides.items()
                if side.startswith("engine-") and side != "engine-monitoring-off"
            }
        off = sides.get("engine-monitoring-off")
        if b and off:
            summary["monitoring_cost"] = 1 - b["tokens_per_s"] / off["tokens_per_s"]
        out[job] = summary
    return out


def machine() -> dict[str, Any]:
    import peft
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    for mod in ("liger_kernel", "bitsandbytes"):
        try:
            from importlib.metadata import version

            info[mod] = version(mod.replace("_", "-"))
        except Exception:
            info[mod] = None
    return info


def print_table(summary: dict[str, Any], mem_label: str) -> None:
    print(f"\n| job | side | tokens/s (median) | runs | {mem_label} | loss of step 1 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for job, s in summary.items():
        for side, v in s["sides"].items():
            peak = f"{v['peak_mb'] / 1024:.2f} GiB" if v["peak_mb"] is not None else "n/a"
            loss = f"{v['first_loss']:.5f}" if v["first_loss"] is not None else "n/a"
            runs = ", ".join(f"{x:,.0f}" for x in v["tokens_per_s_runs"])
            print(f"| {job} | {side} | {v['tokens_per_s']:,.0f} | {runs} | {peak} | {loss} |")
    print()
    for job, s in summary.items():
        parts = []
        if "speed_ratio" in s:
            parts.append(f"tokens/s engine/trainer = {s['speed_ratio']:.3f}")
        if "memory_ratio" in s:
            parts.append(f"peak memory engine/trainer = {s['memory_ratio']:.3f}")
        if "first_loss_diff" in s:
            parts.append(f"|step-1 loss diff| = {s['first_loss_diff']:.2e}")
        if "monitoring_cost" in s:
            parts.append(f"monitoring cost = {100 * s['monitoring_cost']:.2f}%")
        for side, ratio in s.get("variant_speed_ratio", {}).items():
            parts.append(f"tokens/s {side}/trainer = {ratio:.3f}")
        print(f"{job}: " + ", ".join(parts))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vs_trainer", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("cpu", "gpu"), default="gpu" if torch.cuda.is_available() else "cpu")
    p.add_argument("--job", choices=("fixed", "variable", "all"), default="all")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps before them")
    p.add_argument("--repeats", type=int, default=2, help="a/b pairs per job, alternating")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024, help="fixed length; longest variable length")
    p.add_argument("--min-len", type=int, default=64, help="shortest variable length")
    p.add_argument("--monitoring", action="store_true", help="also time the engine with its monitoring off")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads for both sides (0: all cores but one on the CPU, as the engine picks)",
    )
    p.add_argument(
        "--engine-set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override an engine setting (repeatable), e.g. train.torch_compile=true",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:SECTION.KEY=VALUE[,...]",
        help="also time the engine with these overrides, as side engine-NAME (repeatable), "
        "e.g. compile:train.torch_compile=true",
    )
    p.add_argument("--skip-trainer", action="store_true", help="run the engine only (no ratios)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.mode == "gpu" and not torch.cuda.is_available():
        p.error("--mode gpu needs CUDA; use --mode cpu on this machine")
    variants = []
    for v in args.variant:
        name, _, sets = v.partition(":")
        if not name or not sets:
            p.error(f"--variant {v!r}: write NAME:SECTION.KEY=VALUE[,SECTION.KEY=VALUE...]")
        variants.append((name, sets.split(",")))
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.mode == "cpu":
        # The engine leaves a core free on the CPU (for the GUI's thread); both sides get the same.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    from tunedeck.engine import builtin

    hf_logging.disable_progress_bar()  # the engine does this itself; the same for Trainer's loads

    model_dir = llama_1b_dir() if args.mode == "gpu" else builtin.tiny_model_dir()
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    jobs = ("fixed", "variable") if args.job == "all" else (args.job,)
    info = machine()
    print(
        f"mode {args.mode}, model {model_dir.name}, batch {args.batch}, seq_len {args.seq_len}, "
        f"warmup {args.warmup}, steps {args.steps}, repeats {args.repeats}"
        + (f", engine overrides {args.engine_set}" if args.engine_set else ""),
        flush=True,
    )
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="tunedeck-bench-") as d:
        tmp = Path(d)
        for name in jobs:
            job = make_job(name, args, model_dir, vocab, tmp)
            for i in range(args.repeats):
                runs = [lambda j=job, i=i: run_engine(j, i)]
                if not args.skip_trainer:
                    runs.insert(0, lambda j=job, i=i: run_trainer(j, i))
                if args.monitoring:
                    runs.append(lambda j=job, i=i: run_engine(j, i, monitoring=False))
                runs += [lambda j=job, i=i, v=v: run_engine(j, i, variant=v) for v in variants]
                # a, b, c then c, b, a: a drift over the process's life (allocator, heap, clocks)
                # then favours no side.
                for run in runs if i % 2 == 0 else runs[::-1]:
                    r = run()
                    results.append(r)
                    peak = f"{r.peak_mb:,.0f} MiB" if r.peak_mb is not None else "n/a"
                    loss = f"{r.first_loss:.5f}" if r.first_loss is not None else "n/a"
                    print(
                        f"  {name:8s} {r.side:22s} run {i}: {r.tokens_per_s:10,.0f} tokens/s  "
                        f"({r.tokens} tokens in {r.seconds:.2f} s), peak {peak}, step-1 loss {loss}  {r.info}",
                        flush=True,
                    )
    summary = summarize(results)
    mem_label = "peak allocated" if args.mode == "gpu" else "peak RSS delta"
    print_table(summary, mem_label)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "command": " ".join(["python -m bench.vs_trainer", *(argv or sys.argv[1:])]),
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "machine": info,
                    "summary": summary,
                    "runs": [asdict(r) for r in results],
                },
                indent=2,
            )
        )
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
