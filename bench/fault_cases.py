"""The fault and bad-input cases of the robustness issue, each run for real through a CLI, one table row each.

python -m bench.fault_cases [--train PATH/TO/tunedeck-train] [--only NAME ...]

Every case starts ``tunedeck-train`` as a user would (a subprocess, real signals, a real full tmpfs,
real files) and reports its exit status, the line that says what happened and the seconds it took.
``--train`` picks the executable, so the same table can be made for an older checkout: that is how
the closing note's "before" column was measured. Mounting tmpfs needs root; without it those cases
say so. Runs use builtin:tiny with short settings (max_length 64, LoRA r 4, no eval).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

FAST = ["--set", "data.max_length=64", "--set", "train.eval_steps=0", "--set", "lora.r=4"]
HANG_S = 90.0  # a case still running after this long is reported as a hang and killed


class Case:
    def __init__(self, train: str, work: Path) -> None:
        self.train, self.work = train, work

    def start(self, *args: str) -> subprocess.Popen[str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        return subprocess.Popen(
            [self.train, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=self.work,
        )

    def finish(self, p: subprocess.Popen[str], began: float) -> dict:
        try:
            out, _ = p.communicate(timeout=max(1.0, HANG_S - (time.monotonic() - began)))
            code: int | str = p.returncode
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            code = f"hung, killed after {HANG_S:.0f} s"
        return {"code": code, "out": out, "s": time.monotonic() - began}

    def run(self, *args: str) -> dict:
        began = time.monotonic()
        return self.finish(self.start(*args), began)

    def run_until(self, args: list[str], ready: Callable[[], bool], then: Callable[[int], None]) -> dict:
        """Start, wait until ``ready()``, call ``then(pid)`` (a signal, a control line), see it end."""
        began = time.monotonic()
        p = self.start(*args)
        while not ready() and p.poll() is None and time.monotonic() - began < HANG_S:
            time.sleep(0.05)
        if p.poll() is None:
            then(p.pid)
        return self.finish(p, began)


def steps_in(run_dir: Path) -> int:
    with contextlib.suppress(OSError):
        return sum(1 for line in (run_dir / "metrics.jsonl").open() if '"type": "step"' in line)
    return 0


def events(run_dir: Path) -> list[dict]:
    out = []
    with contextlib.suppress(OSError):
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def said(r: dict, *needles: str) -> str:
    """The first output line holding one of ``needles`` (else the last line), for the table."""
    lines = [x.strip() for x in r["out"].splitlines() if x.strip()]
    for n in needles:
        for x in lines:
            if n in x:
                return x
    return lines[-1] if lines else "(no output)"


@contextlib.contextmanager
def tmpfs(where: Path, size: str, ro: bool = False) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    opts = f"{'ro,' if ro else ''}size={size}"
    if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)]).returncode:
        raise RuntimeError("mount failed (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)])


def fill(where: Path) -> None:
    with open(where / "filler", "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()


# ---------------------------------------------------------------------------- the cases


def checkpoint_on_full_disk(c: Case) -> tuple[dict, str]:
    with tmpfs(c.work / "disk", "6m") as disk:
        r = c.run(
            "--output-dir",
            str(disk),
            "--set",
            "train.run_name=r",
            "--set",
            "train.max_steps=8",
            "--set",
            "train.save_steps=2",
            "--set",
            "data.max_length=64",
            "--set",
            "train.eval_steps=0",
        )
        kept = sorted(p.name for p in (disk / "r" / "checkpoints").glob("step-*"))
        note = f"{steps_in(disk / 'r')} steps logged; checkpoints on disk: {kept or 'none'}"
        return r, f"{said(r, 'no space', 'internal error', 'error')} | {note}"


def metrics_on_full_disk(c: Case) -> tuple[dict, str]:
    with tmpfs(c.work / "disk", "2m") as disk:
        (disk / "r").mkdir()
        fill(disk)
        r = c.run("--output-dir", str(disk), "--set", "train.max_steps=4", *FAST)
        return r, said(r, "no space", "internal error", "error")


def _signal_mid_run(c: Case, sig: signal.Signals) -> tuple[dict, str]:
    out = c.work / "runs"
    args = ["--output-dir", str(out), "--set", "train.run_name=r", "--set", "train.max_steps=2000", *FAST]
    r = c.run_until(args, lambda: steps_in(out / "r") >= 2, lambda pid: os.kill(pid, sig))
    final = (out / "r" / "final").is_dir()
    ends = [e for e in events(out / "r") if e.get("type") == "end"]
    end = f"end {ends[-1]['status']} at step {ends[-1]['step']}" if ends else "no end event"
    return r, f"{end}; final/ {'saved' if final else 'not saved'}"


def sigterm(c: Case) -> tuple[dict, str]:
    return _signal_mid_run(c, signal.SIGTERM)


def sighup(c: Case) -> tuple[dict, str]:
    return _signal_mid_run(c, signal.SIGHUP)


def second_ctrl_c_while_loading(c: Case) -> tuple[dict, str]:
    def twice(pid: int) -> None:
        os.kill(pid, signal.SIGINT)
        time.sleep(0.5)
        os.kill(pid, signal.SIGINT)

    began = time.monotonic()
    # Ready once the process prints anything (torch imported, the run is being set up).
    box: dict = {}
    out = c.work / "runs"
    args = ["--output-dir", str(out), "--set", "train.max_steps=2000", *FAST]
    r = c.run_until(args, lambda: time.monotonic() - began > 2.5, twice)
    box["s"] = r["s"] - 2.5
    return r, f"{said(r, 'cancel', 'interrupt')} | ended {box['s']:.1f} s after the first Ctrl-C"


def nonfinite_headless(c: Case) -> tuple[dict, str]:
    # An adapter scaled by 1e8 / r, unclipped: the gradients overflow at step 3.
    out = c.work / "runs"
    r = c.run(
        "--output-dir",
        str(out),
        "--set",
        "train.run_name=r",
        "--set",
        "train.max_steps=40",
        "--set",
        "train.learning_rate=0.5",
        "--set",
        "lora.alpha=100000000",
        "--set",
        "train.max_grad_norm=0",
        "--set",
        "train.warmup_steps=0",
        *FAST,
    )
    return r, said(r, "not finite", "non-finite", "nan")


def _base_run(c: Case) -> Path:
    """A finished run of 6 steps with checkpoints at 2 and 4, shared by the resume cases."""
    out = c.work / "base"
    if not (out / "r" / "final").is_dir():
        c.run(
            "--output-dir",
            str(out),
            "--set",
            "train.run_name=r",
            "--set",
            "train.max_steps=6",
            "--set",
            "train.save_steps=2",
            *FAST,
        )
    return out / "r"


def _resume(c: Case, *sets: str, extra: tuple[str, ...] = ()) -> tuple[dict, Path]:
    base = _base_run(c)
    work = c.work / f"resume-{abs(hash(sets + extra)) % 10**8}"
    shutil.copytree(base, work / "r")
    args = ["--resume", str(work / "r" / "checkpoints" / "step-000002"), *extra]
    for s in sets:
        args += ["--set", s]
    return c.run(*args), work


def _resume_case(*sets: str) -> Callable[[Case], tuple[dict, str]]:
    def case(c: Case) -> tuple[dict, str]:
        r, work = _resume(c, *sets)
        runs = [p for p in work.iterdir() if (p / "metrics.jsonl").exists()]
        changes = [
            f"{e['source']}: {sorted(e['changes'])}"
            for p in runs
            for e in events(p)
            if e.get("type") == "change" and e.get("source") == "resume"
        ]
        return r, f"{said(r, 'error', 'refused', 'completed')} | resume changes: {changes or 'none'}"

    case.__name__ = "resume_set_" + "_".join(s.split("=")[0].split(".")[-1] for s in sets)
    return case


def resume_output_dir(c: Case) -> tuple[dict, str]:
    other = c.work / "elsewhere"
    r, _ = _resume(c, extra=("--output-dir", str(other)))
    got = sorted(p.name for p in other.iterdir()) if other.is_dir() else []
    return r, f"{said(r, 'error', 'completed')} | {other.name}/ holds {got or 'nothing'}"


def resume_earlier_checkpoint_of_finished_run(c: Case) -> tuple[dict, str]:
    base = _base_run(c)
    work = c.work / "finished"
    shutil.copytree(base, work / "r")
    before = (work / "r" / "final" / "adapter_model.safetensors").read_bytes()
    r = c.run("--resume", str(work / "r" / "checkpoints" / "step-000002"))
    after = (work / "r" / "final" / "adapter_model.safetensors").read_bytes()
    folders = sorted(p.name for p in work.iterdir())
    parent = [p.name for p in work.iterdir() if (p / "parent.json").exists()]
    return r, (
        f"the finished run's final/ {'unchanged' if after == before else 'OVERWRITTEN'}; "
        f"run folders {folders}; naming a parent: {parent or 'none'}"
    )


def checkpoint_without_rng_state(c: Case) -> tuple[dict, str]:
    base = _base_run(c)
    work = c.work / "no-rng"
    shutil.copytree(base, work / "r")
    (work / "r" / "checkpoints" / "step-000002" / "rng_state.pt").unlink()
    r = c.run("--resume", str(work / "r" / "checkpoints" / "step-000002"))
    return r, said(r, "error")


def _refused(
    *args: str, where: Callable[[Case], list[str]] | None = None
) -> Callable[[Case], tuple[dict, str]]:
    def case(c: Case) -> tuple[dict, str]:
        extra = where(c) if where else []
        r = c.run("--output-dir", str(c.work / "runs"), "--set", "train.max_steps=2", *FAST, *args, *extra)
        return r, said(r, "error")

    return case


def _output_dir_file(c: Case) -> list[str]:
    f = c.work / "afile"
    f.write_text("x")
    return ["--output-dir", str(f)]


def _output_dir_ro(c: Case) -> list[str]:
    ro = c.work / "ro"
    ro.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    return ["--output-dir", str(ro)]


def _controlled(out: Path, ctl: Path) -> list[str]:
    """A long run named r in ``out``, steered through the control file ``ctl``."""
    return ["--output-dir", str(out), "--set", "train.run_name=r", "--set", "train.max_steps=2000",
            "--control", str(ctl), *FAST]  # fmt: skip


def control_hostile_lines(c: Case) -> tuple[dict, str]:
    out, ctl = c.work / "runs", c.work / "ctl.jsonl"
    ctl.write_bytes(b"")

    def hostile(pid: int) -> None:
        with open(ctl, "ab") as f:
            for chunk in (b'{"cmd": ["set"]}\n', b"\xe9t\xe9\n", b"not json\n", b'{"cmd": "pa'):
                f.write(chunk)
                f.flush()
                time.sleep(0.2)
            f.write(b'use"}\n')  # a line split across two writes
            f.flush()
            time.sleep(0.5)
            f.write(b'{"cmd": "resume"}\n{"cmd": "stop"}\n')

    args = _controlled(out, ctl)
    r = c.run_until(args, lambda: steps_in(out / "r") >= 1, hostile)
    errs = [e["message"][:60] for e in events(out / "r") if e.get("type") == "error"]
    ends = [e["status"] for e in events(out / "r") if e.get("type") == "end"]
    return r, f"end: {ends or 'none'}; error events: {len(errs)} ({'; '.join(errs[:3])})"


def control_in_missing_folder(c: Case) -> tuple[dict, str]:
    r = c.run("--output-dir", str(c.work / "runs"), "--control", str(c.work / "nope" / "ctl.jsonl"), *FAST)
    return r, said(r, "error")


def control_is_a_folder(c: Case) -> tuple[dict, str]:
    r = c.run("--output-dir", str(c.work / "runs"), "--control", str(c.work), *FAST)
    return r, said(r, "error")


def sample_prompt_too_long(c: Case) -> tuple[dict, str]:
    out, ctl = c.work / "runs", c.work / "ctl.jsonl"
    ctl.write_text("")

    def send(pid: int) -> None:
        with open(ctl, "a") as f:
            f.write(json.dumps({"cmd": "sample", "prompt": "word " * 20000}) + "\n")
            f.flush()
            time.sleep(1.0)
            f.write('{"cmd": "stop"}\n')

    args = _controlled(out, ctl)
    r = c.run_until(args, lambda: steps_in(out / "r") >= 1, send)
    errs = [e["message"][:110] for e in events(out / "r") if e.get("type") == "error"]
    return r, f"{errs[0] if errs else 'no error event'} | run ended {r['s']:.0f} s after start"


def _data(rows: list[dict], name: str = "d.jsonl") -> Callable[[Case], tuple[dict, str]]:
    def case(c: Case) -> tuple[dict, str]:
        f = c.work / name
        f.write_text("".join(json.dumps(x) + "\n" for x in rows))
        r = c.run(
            "--output-dir",
            str(c.work / "runs"),
            "--set",
            f"data.path={f}",
            "--set",
            "train.max_steps=2",
            "--set",
            "data.eval_fraction=0",
            *FAST,
        )
        return r, said(r, "error", "warning", "completed")

    return case


def _chat(role: str) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"question {i}"}, {"role": role, "content": f"answer {i}"}]}
        for i in range(40)
    ]


def dataset_folder_that_fails_to_parse(c: Case) -> tuple[dict, str]:
    d = c.work / "ds"
    d.mkdir()
    (d / "train.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    r = c.run(
        "--output-dir", str(c.work / "runs"), "--set", f"data.path={d}", "--set", "train.max_steps=2", *FAST
    )
    return r, said(r, "error")


CASES: dict[str, Callable[[Case], tuple[dict, str]]] = {
    "checkpoint on a full disk (6 MB tmpfs)": checkpoint_on_full_disk,
    "metrics.jsonl on a full disk": metrics_on_full_disk,
    "SIGTERM mid-run": sigterm,
    "SIGHUP mid-run": sighup,
    "two Ctrl-C while loading": second_ctrl_c_while_loading,
    "non-finite loss, headless (lora.alpha 1e8, no clipping)": nonfinite_headless,
    "resume --set train.learning_rate=1e-3": _resume_case("train.learning_rate=1e-3"),
    "resume --set lr_scheduler_type, warmup, accumulation, max_steps": _resume_case(
        "train.lr_scheduler_type=constant",
        "train.warmup_steps=1",
        "train.gradient_accumulation_steps=2",
        "train.max_steps=8",
    ),
    "resume --set lr_scheduler_type=constant, gradient_accumulation_steps=2": _resume_case(
        "train.lr_scheduler_type=constant", "train.gradient_accumulation_steps=2"
    ),
    "resume --set train.per_device_train_batch_size=2": _resume_case("train.per_device_train_batch_size=2"),
    "resume --set data.max_length=32": _resume_case("data.max_length=32"),
    "resume --set train.seed=7": _resume_case("train.seed=7"),
    "resume --set train.optim=sgd": _resume_case("train.optim=sgd"),
    "resume --set lora.r=8": _resume_case("lora.r=8"),
    "resume --output-dir elsewhere": resume_output_dir,
    "resume an earlier checkpoint of a finished run": resume_earlier_checkpoint_of_finished_run,
    "resume a checkpoint without rng_state.pt": checkpoint_without_rng_state,
    "output dir is a file": _refused(where=_output_dir_file),
    "output dir read-only (ro tmpfs)": _refused(where=_output_dir_ro),
    "output dir under /proc": _refused("--output-dir", "/proc/tunedeck"),
    "num_train_epochs=inf": _refused("--set", "train.max_steps=-1", "--set", "train.num_train_epochs=inf"),
    "seed=1e30": _refused("--set", "train.seed=1e30"),
    "lr_scheduler_kwargs of a wrong type": _refused(
        "--set",
        "train.lr_scheduler_type=cosine",
        "--set",
        "train.lr_scheduler_kwargs={num_cycles: abc}",
        "--set",
        "train.max_steps=6",
        "--set",
        "train.warmup_steps=2",
    ),
    "lr_scheduler_kwargs with an unknown key": _refused(
        "--set", "train.lr_scheduler_type=cosine", "--set", "train.lr_scheduler_kwargs={num_cycle: 2}"
    ),
    "attn_implementation=flash_attention_2 without flash-attn": _refused(
        "--set", "model.attn_implementation=flash_attention_2"
    ),
    "run_name=../../etc": _refused("--set", "train.run_name=../../etc"),
    "control line hostile (bad cmd, Latin-1, split UTF-8/JSON)": control_hostile_lines,
    "control path in a missing folder": control_in_missing_folder,
    "control path is a folder": control_is_a_folder,
    "sample prompt of 100k characters": sample_prompt_too_long,
    "messages row with role 'wizard'": _data(_chat("wizard")),
    "messages row with role 'assitant'": _data(_chat("assitant")),
    "dataset folder whose file fails to parse": dataset_folder_that_fails_to_parse,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", default=str(Path(sys.executable).parent / "tunedeck-train"))
    ap.add_argument("--only", nargs="*", help="substrings of the case names to run")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tunedeck-faults-") as tmp:
        shared = Path(tmp) / "shared"
        shared.mkdir()
        for i, (name, case) in enumerate(CASES.items()):
            if args.only and not any(o in name for o in args.only):
                continue
            work = shared if "resume" in name else Path(tmp) / f"case-{i}"
            work.mkdir(exist_ok=True)
            try:
                r, what = case(Case(args.train, work))
            except Exception as e:  # the harness's own trouble (no root for a mount), said in the row
                r, what = {"code": "-", "s": 0.0}, f"not run: {type(e).__name__}: {e}"
            finally:
                subprocess.run(["sh", "-c", f"grep -o ' {tmp}[^ ]*' /proc/mounts | xargs -r umount -l"])
            row = {"case": name, "code": r["code"], "what": what.replace("|", "/"), "s": round(r["s"], 1)}
            rows.append(row)
            print(f"| {row['case']} | {row['code']} | {row['what']} | {row['s']} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
