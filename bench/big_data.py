"""Datasets larger than memory: peak RSS and time to first step of ``tunedeck-train`` on big JSONL files.

    python -m bench.big_data [--sizes 20 200] [--runs cold warm] [--code DIR] [--cap-gb 6] [--out r.json]
    python -m bench.big_data --demo [--steps 60] [--repeats 4]

Each size writes (once, into ``--work``) a prompt/completion JSONL of that many MB, ~935 bytes a
row (200 MB is 213k rows, like the 214k of the report that started this), then runs
``python -m tunedeck.engine.cli`` on it as a child process: the demo preset (``builtin:tiny``,
batch 16) with ``data.path`` set, ``data.max_length`` 512 (most rows are longer: they are cut),
3 steps, no eval, no periodic save. ``cold`` runs with an empty data cache, ``warm`` right after
with the cache the cold run left. Reported per run: the child's peak RSS (``ru_maxrss`` from
``wait4``); the time from spawning it to its first step (the ``time`` of the first ``step`` event
in metrics.jsonl), of which importing and loading the tiny model take several seconds whatever the
data; and, sampled at 20 Hz from /proc, the peaks of its anonymous memory and of its resident
pages of mapped files (clean pages the kernel can drop). A child whose RSS passes ``--cap-gb``
(also sampled at 20 Hz) is killed and reported as such, so the old code cannot take the machine
down.

``--code DIR`` runs the child against another tree of the package (``DIR/tunedeck/engine/...``,
e.g. an export of an older commit) through PYTHONPATH; the default is the installed one.

``--demo`` times the training loop on ``builtin:demo`` in this process (steps/s from the step
events' ``elapsed_s``, between step 10 and the last) with the splits as ``load_examples`` gives them
(each ``train[j]`` read from the Arrow file) and with the same examples in Python lists, alternating,
to check that reading examples row by row costs the loop nothing; and the time of one ``train[j]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

WORDS = (  # noqa: SIM905 (a list of 120 words is easier to read as text)
    "the of and to in is was for on that with as by at from it an be this which or are have not "
    "but had they were his her one all their there been has when who will more no if out so said "
    "what up its about into than them can only other new some could time these two may then do "
    "first any my now such like our over man me even most made after also did many before must "
    "through back years where much your way well down should because each just those people how "
    "model train data token learn rate batch step loss value layer weight shape memory file row"
).split()
ROW_BYTES = 935  # the report's file: 200 MB in 214k rows


def _text(rng: random.Random, n_bytes: int) -> str:
    out: list[str] = []
    size = 0
    while size < n_bytes:
        w = rng.choice(WORDS)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)


def make_jsonl(path: Path, megabytes: float, seed: int = 0) -> Path:
    """A prompt/completion JSONL of about ``megabytes`` MB (10**6 bytes), written once."""
    if path.is_file() and path.stat().st_size >= megabytes * 1e6:
        return path
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    written = 0
    with tmp.open("w", encoding="utf-8") as f:
        while written < megabytes * 1e6:
            n = rng.randint(ROW_BYTES // 2, ROW_BYTES * 3 // 2) - 40
            line = json.dumps(
                {"prompt": "Continue: " + _text(rng, n // 4), "completion": _text(rng, n * 3 // 4)}
            )
            f.write(line + "\n")
            written += len(line) + 1
    tmp.rename(path)
    return path


def _child_env(cache: Path, code: str | None) -> dict[str, str]:
    env = {**os.environ, "TUNEDECK_CACHE": str(cache)}
    if code:
        env["PYTHONPATH"] = code + os.pathsep + env.get("PYTHONPATH", "")
    return env


def prepare_cache(cache: Path, code: str | None) -> None:
    """Write builtin:tiny into the bench's cache once, so no run pays for it."""
    cmd = [sys.executable, "-c", "from tunedeck.engine import builtin; builtin.tiny_model_dir()"]
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(cmd, env=_child_env(cache, code), cwd=cache.parent, check=True)


def train_once(
    data: Path, out: Path, cache: Path, code: str | None, cap_gb: float, sets: list[str], timeout: float
) -> dict[str, Any]:
    """One ``tunedeck-train`` child: its peak RSS, time to first step, exit status."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "tunedeck.engine.cli", "--output-dir", str(out), "--quiet"]
    for s in [f"data.path={data}", *sets]:
        cmd += ["--set", s]
    t0 = time.time()
    # Run from the cache's folder: from a checkout, its tunedeck/ folder would shadow ``--code``.
    proc = subprocess.Popen(
        cmd, env=_child_env(cache, code), cwd=cache.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    killed: dict[str, Any] = {}
    peaks = {"RssAnon": 0, "RssFile": 0}

    def watch() -> None:
        p = psutil.Process(proc.pid)
        while proc.returncode is None:
            try:
                rss = p.memory_info().rss
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except (psutil.Error, OSError):
                return
            for line in status.splitlines():
                key, _, value = line.partition(":")
                if key in peaks:
                    peaks[key] = max(peaks[key], int(value.split()[0]))
            if rss > cap_gb * 2**30 or time.time() - t0 > timeout:
                killed.update(rss_gb=rss / 2**30, after_s=time.time() - t0)
                proc.kill()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    watcher.join()
    first_step = None
    for metrics in out.glob("*/metrics.jsonl"):
        for line in metrics.read_text().splitlines():
            event = json.loads(line)
            if event.get("type") == "step":
                first_step = event["time"] - t0
                break
    return {
        "exit": proc.returncode,
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
        # sampled at 20 Hz: anonymous memory, and pages of mapped files (which the kernel can drop)
        "peak_anon_mb": round(peaks["RssAnon"] / 1024),
        "peak_file_mb": round(peaks["RssFile"] / 1024),
        "first_step_s": None if first_step is None else round(first_step, 1),
        "wall_s": round(time.time() - t0, 1),
        "killed": killed or None,
        "tail": output.strip().splitlines()[-3:],
    }


def run_sizes(args: argparse.Namespace) -> list[dict[str, Any]]:
    work = Path(args.work)
    cache = work / "cache"
    prepare_cache(cache, args.code)
    sets = ["data.max_length=512", "train.max_steps=3", "train.eval_steps=0", "train.save_steps=0"]
    results = []
    for mb in args.sizes:
        data = make_jsonl(work / f"big-{mb:g}mb.jsonl", mb)
        shutil.rmtree(cache / "data", ignore_errors=True)
        for kind in args.runs:
            r = train_once(data, work / "runs", cache, args.code, args.cap_gb, sets, args.timeout)
            r.update(size_mb=mb, rows=sum(1 for _ in data.open("rb")), run=kind)
            results.append(r)
            print(json.dumps(r), flush=True)
    return results


def run_demo(args: argparse.Namespace) -> list[dict[str, Any]]:
    """steps/s of the trainer on builtin:demo in this process, its splits as loaded (read from the
    Arrow file row by row) and the same splits copied into Python lists, alternating a, b then b, a."""
    import queue

    from tunedeck.engine import builtin, data
    from tunedeck.engine import config as config_mod
    from tunedeck.engine.trainer import Trainer

    loaded = data.load_examples

    def as_lists(*a: Any, **kw: Any) -> Any:
        s = loaded(*a, **kw)
        return data.Splits(train=list(s.train), eval=list(s.eval), format=s.format, dropped=s.dropped)

    sets = [
        f"train.max_steps={args.steps}",
        "train.eval_steps=0",
        "train.save_steps=0",
        f"train.output_dir={Path(args.work) / 'runs-demo'}",
    ]
    results = []
    try:
        for r in range(args.repeats):
            for kind in ("arrow", "list") if r % 2 == 0 else ("list", "arrow"):
                data.load_examples = loaded if kind == "arrow" else as_lists
                events: list[Any] = []
                cfg = config_mod.apply_overrides(config_mod.load(builtin.DEMO_PRESET), sets)
                Trainer(cfg, events.append, queue.Queue()).run()
                steps = [e for e in events if e.type == "step"]
                a, b = steps[9], steps[-1]
                result = {
                    "examples": kind,
                    "steps_per_s": round((b.step - a.step) / (b.elapsed_s - a.elapsed_s), 2),
                    "median_step_ms": round(statistics.median(e.step_time_s for e in steps[10:]) * 1000, 2),
                }
                results.append(result)
                print(json.dumps(result), flush=True)
    finally:
        data.load_examples = loaded
    print(json.dumps(access_times()), flush=True)
    return results


def access_times(n: int = 20_000) -> dict[str, float]:
    """Microseconds per ``train[j]`` in random order: the Arrow-backed split and a plain list of it."""
    from tunedeck.engine import builtin, data
    from tunedeck.engine.config import DataConfig

    splits = data.load_examples(DataConfig(), builtin.build_tokenizer(), seed=42)
    as_list = list(splits.train)
    order = [random.Random(0).randrange(len(as_list)) for _ in range(n)]
    out = {}
    for name, seq in (("arrow", splits.train), ("list", as_list)):
        t = time.perf_counter()
        for j in order:
            seq[j]
        out[f"{name}_us_per_access"] = round((time.perf_counter() - t) / n * 1e6, 2)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.big_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[20, 200], help="file sizes in MB")
    p.add_argument("--runs", nargs="+", default=["cold", "warm"], choices=["cold", "warm"])
    p.add_argument("--code", help="run the child against this tree of the package (PYTHONPATH)")
    p.add_argument("--cap-gb", type=float, default=6.0, help="kill a child whose RSS passes this")
    p.add_argument("--timeout", type=float, default=900.0, help="kill a child that runs longer (s)")
    p.add_argument("--work", default="/tmp/tunedeck-big-data", help="generated files, cache and runs")
    p.add_argument("--demo", action="store_true", help="time the loop on builtin:demo instead")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--out", help="write the results here as JSON")
    args = p.parse_args(argv)
    results = run_demo(args) if args.demo else run_sizes(args)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
