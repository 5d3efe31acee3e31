"""Runs on several processes: torchrun, DDP and FSDP2 on the CPU with gloo, 2 processes.

The quick tests check the arithmetic and the launcher's command line in this process. The slow ones
start real process groups: one torchrun runs the scenarios of ``dist_worker.py`` (the imports are paid
once), compared with one-process runs made here; the last starts ``tunedeck-train --nproc-per-node 2`` and
kills one of its processes. (test_follow.py steers such a run through its folder and interrupts it.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.engine.helpers import make_cfg, of, run, steps
from tunedeck.engine import checkpoint, cli, data, distributed, launch
from tunedeck.engine import config as config_mod
from tunedeck.engine.distributed import Dist
from tunedeck.engine.errors import ConfigError
from tunedeck.engine.plan import StepPlan
from tunedeck.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
# Equal "within fp32": the processes sum the same terms in another order. Measured here: 4e-8 after the
# 4 SGD steps (as between one process at batch 8 x 1 and at 4 x 2); 4e-5 after the live changes and 3
# Adam steps, which turn a rounding difference in a near-zero gradient into a step of up to the learning
# rate (1e-3); 2e-6 after a resume on another count (the last 2 or 3 steps).
SGD_ATOL = 1e-6
ADAM_ATOL = 1e-4
RESUME_ATOL = 2e-5

# ------------------------------------------------------------------ in this process


def test_one_process_is_a_no_op():
    d = Dist()
    examples = [{"input_ids": [1, 2], "labels": [1, 2]}] * 3
    assert not d.enabled and d.is_main and not d.shards and d.describe() == {}
    assert d.shard(examples) is examples and d.loss_items(7) == 7 and isinstance(d.loss_items(7), int)
    assert d.share(["x"]) == ["x"] and d.from_main(5) == 5 and d.any(True) and not d.any(False)
    batches = [{"labels": torch.zeros(1, 2)}]
    assert d.eval_share(batches) is batches and d.sum(torch.tensor(2.5)) == 2.5
    assert d.model_state(torch.nn.Linear(2, 2), trainable_only=True) is None
    assert d.rng_states() is None and d.failures() == {}


def test_each_process_takes_its_share_of_a_micro_batch():
    examples = [{"input_ids": [i, i], "labels": [i, i]} for i in range(7)]
    shares = [Dist(rank=r, world_size=3).shard(examples) for r in range(3)]
    assert [len(s) for s in shares] == [2, 2, 3] and sum(shares, []) == examples
    assert Dist(rank=1, world_size=2).loss_items(13) == 6.5
    # One example left at an epoch's end: the first process runs one without targets.
    last = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}]
    assert Dist(rank=0, world_size=2).shard(last) == [{"input_ids": [5, 6, 7], "labels": [-100] * 3}]
    assert Dist(rank=1, world_size=2).shard(last) == last


@pytest.mark.parametrize("packed", [False, True])
def test_counts_from_the_examples_match_the_collated_batch(packed):
    examples = [
        {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]},
        {"input_ids": [5, 6], "labels": [5, 6]},
        {"input_ids": [7, 8, 9], "labels": [-100, 8, -100]},
    ]
    batch = data.collate(examples, pad_token_id=0, packing=packed)
    tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    assert distributed.example_counts(examples) == (data.count_targets(batch), tokens) == (4, 9)


def test_distributed_setting_is_checked():
    with pytest.raises(ConfigError) as e:
        config_mod.apply_overrides(config_mod.Config(), ["train.distributed=zero"])
    assert e.value.one_line() == "train.distributed='zero' is not a known choice (allowed: ddp, fsdp)"
    cfg = config_mod.Config()
    cfg.train.distributed, cfg.model.load_in_4bit = "fsdp", True
    distributed.check(cfg, 1)  # one process shards nothing
    with pytest.raises(ConfigError, match="train.distributed=fsdp cannot shard a quantized base model"):
        distributed.check(cfg, 2)


def test_a_checkpoint_resumes_on_a_count_that_splits_its_micro_batch(tmp_path):
    t = Trainer(make_cfg(tmp_path), lambda e: None, None, dist=Dist(rank=0, world_size=3))  # type: ignore[arg-type]
    t.plan = StepPlan(examples=100, batch_size=4, accumulation=1, total_steps=10)
    with pytest.raises(ConfigError) as e:
        t._fit_processes(2)
    assert e.value.one_line() == (
        "the checkpoint's micro-batch of 4 examples (all 2 processes together) does not split evenly over "
        "3 processes (resume on 1, 2, 4 processes)"
    )


def test_a_broken_connection_is_another_process_failing_anything_else_is_ours():
    d = Dist(rank=0, world_size=2)  # no process group: no store to read the others' errors from
    gloo = RuntimeError(
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
        "[127.0.0.1]:23220. This is typically caused by a remote worker crashing. GLHF!"
    )
    failure = d.peer_failure(gloo)
    assert failure is not None and failure.kind == "internal"
    assert failure.message == (
        "another process of the run stopped answering (killed, or it crashed without a word): "
        "Connection closed by peer [127.0.0.1]:23220"
    )
    assert d.peer_failure(ValueError("a bug of this process")) is None


def test_torchrun_command_line():
    args = cli.parse_args(["my.yaml", "--nproc-per-node", "2", "--set", "train.max_steps=3", "--quiet"])
    assert args.config == "my.yaml" and args.overrides == ["train.max_steps=3"]
    assert args.argv == ["my.yaml", "--set", "train.max_steps=3", "--quiet"]
    assert launch.requested(args.launch) and launch.world_size(args.launch) == 2
    assert launch.torchrun_command(args.launch, args.argv) == [
        PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "--signals-to-handle", "SIGTERM,SIGHUP,SIGQUIT", "-m", "tunedeck.engine.cli",
        "my.yaml", "--set", "train.max_steps=3", "--quiet",
    ]  # fmt: skip
    args = cli.parse_args(
        ["--nproc-per-node=4", "--nnodes", "2", "--rdzv-endpoint", "h:29400", "--rdzv-id", "j"]
    )
    assert launch.world_size(args.launch) == 8
    assert launch.torchrun_command(args.launch, args.argv)[3:] == [
        "--nproc-per-node", "4", "--nnodes", "2", "--rdzv-endpoint", "h:29400", "--rdzv-id", "j",
        "--rdzv-backend", "c10d", "--signals-to-handle", "SIGTERM,SIGHUP,SIGQUIT", "-m", "tunedeck.engine.cli",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "argv, line",
    [
        (["--nproc-per-node", "0"], "--nproc-per-node 0 is not a whole number >= 1"),
        (["--nnodes", "2"], "the torchrun options need --nproc-per-node N"),
        (
            ["--nproc-per-node", "2", "--set", "train.distributed=fsdp", "--set", "model.load_in_8bit=true"],
            "train.distributed=fsdp cannot shard a quantized base model (model.load_in_8bit=true)",
        ),
    ],
)
def test_bad_launcher_options_exit_2_with_one_line(argv, line, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tunedeck-train: error: {line}")


# ------------------------------------------------------------------ one torchrun, many scenarios

# SGD for 4 steps, so the weights after them show the update itself (Adam's first steps turn a rounding
# difference in a near-zero gradient into a step of the learning rate's size); then live changes to
# Adam (fresh moments), then to fused AdamW (moments carried over, sharded ones under FSDP2).
LIVE = {
    2: [{"cmd": "eval"}, {"cmd": "sample", "prompt": "What is 2+2?", "max_new_tokens": 8}],
    4: [
        {"cmd": "save"},
        {"cmd": "set", "learning_rate": 1e-3, "lr_scheduler_type": "cosine", "optim": "adamw_torch"},
    ],
    5: [{"cmd": "set", "gradient_accumulation_steps": 3, "optim": "adamw_torch_fused"}],
}
# Back to the checkpoint of step 2 at step 3 with a new LR (the FS-wide folders are moved by rank 0 alone).
ROLLBACK = {3: [{"cmd": "rollback", "checkpoint": "latest", "set": {"learning_rate": 1e-3}}]}
ROLLBACK_CFG = {
    "train__max_steps": 5,
    "train__save_steps": 2,
    "train__per_device_train_batch_size": 2,
    "train__gradient_accumulation_steps": 2,
}
TWO_BY_TWO = {"train__per_device_train_batch_size": 2, "train__gradient_accumulation_steps": 2}
BASE = {
    "train__max_steps": 7,
    "train__lr_scheduler_type": "constant",
    "train__optim": "sgd",
    "train__learning_rate": 0.5,
}


def commands(at: dict[int, list[dict]]) -> dict[int, list]:
    from tunedeck.engine.protocol import command_from_dict

    return {k: [command_from_dict(c) for c in v] for k, v in at.items()}


def torchrun(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts each process in its own session: end them by name, not by group.
        for p in psutil.Process(proc.pid).children(recursive=True):
            p.kill()
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"torchrun ran past {timeout} s:\n{out[-2000:]}\n{err[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


class Runs:
    """The scenarios' results and the one-process references."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.refs: dict[str, tuple[list, Trainer]] = {}
        self.proc: subprocess.CompletedProcess | None = None

    def events(self, name: str) -> list[dict]:
        return [json.loads(x) for x in (self.root / name / "events.jsonl").read_text().splitlines()]

    def params(self, name: str, rank: int = 0) -> dict[str, torch.Tensor]:
        return load_file(self.root / name / f"rank{rank}.safetensors")

    def checkpoint(self, name: str, kind: str = "checkpoint") -> Path:
        return Path([e for e in self.events(name) if e["type"] == kind][0]["path"])

    def rank(self, name: str, rank: int) -> dict:
        return json.loads((self.root / name / f"rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("dist")
    r = Runs(root)
    # One-process references, the second also the checkpoint a 1 -> 2 resume starts from.
    r.refs["8x1"] = run(
        make_cfg(root / "ref8x1", **{**BASE, "train__max_steps": 4, "train__per_device_train_batch_size": 8}),
        at=commands({2: LIVE[2]}),
    )
    r.refs["rollback"] = run(
        make_cfg(root / "refrollback", **{**ROLLBACK_CFG, "train__per_device_train_batch_size": 4}),
        at=commands(ROLLBACK),
    )
    r.refs["4x2"] = run(
        make_cfg(
            root / "ref4x2",
            **BASE,
            train__per_device_train_batch_size=4,
            train__gradient_accumulation_steps=2,
        ),
        at=commands(LIVE),
    )
    one_ckpt = r.refs["4x2"][1].run_dir / "checkpoints" / "step-000004"
    resumed_live = {"0": LIVE[4][1:], "5": LIVE[5]}
    scenarios = [
        {"name": "ddp", "cfg": {**BASE, **TWO_BY_TWO, "train__distributed": "ddp"}, "at": LIVE},
        {"name": "fsdp", "cfg": {**BASE, **TWO_BY_TWO, "train__distributed": "fsdp"}, "at": LIVE},
        {"name": "one_to_two_ddp", "resume_from": str(one_ckpt), "at": resumed_live},
        {"name": "one_to_two_fsdp", "resume_from": str(one_ckpt), "resume_set": ["train.distributed=fsdp"], "at": resumed_live},
        {"name": "dropout", "cfg": {"train__max_steps": 6, "train__save_steps": 3, "lora__dropout": 0.1, **TWO_BY_TWO}},
        {"name": "dropout_resumed", "resume_from": str(root / "dropout" / "runs" / "run" / "checkpoints" / "step-000003")},
        {"name": "full_fsdp", "cfg": {"train__max_steps": 3, "train__save_steps": 2, "lora__enabled": False,
                                      "train__distributed": "fsdp", **TWO_BY_TWO}},
        {"name": "rollback_ddp", "cfg": ROLLBACK_CFG, "at": ROLLBACK},
        {"name": "rollback_fsdp", "cfg": {**ROLLBACK_CFG, "train__distributed": "fsdp"}, "at": ROLLBACK},
        {"name": "cancel", "cfg": {"train__max_steps": 6, **TWO_BY_TWO}, "at": {2: [{"cmd": "cancel"}]}},
        {"name": "oom", "cfg": {"train__max_steps": 6, **TWO_BY_TWO}, "oom_rank": 1, "oom_step": 3},
    ]  # fmt: skip
    for s in scenarios:
        s["root"] = str(root / s["name"])
        s["at"] = {str(k): v for k, v in s.get("at", {}).items()}
    spec = root / "spec.json"
    spec.write_text(json.dumps({"scenarios": scenarios}))
    r.proc = torchrun(str(ROOT / "tests" / "engine" / "dist_worker.py"), str(spec), timeout=400)
    return r


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], label: str = "") -> float:
    assert a.keys() == b.keys() and a
    d = max((a[k] - b[k]).abs().max().item() for k in a)
    if label:  # the figure, for the record (pytest -s shows it)
        print(f"max abs difference, {label}: {d:.2e}")
    return d


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_the_whole_batch(runs, name):
    """2 processes x batch 2 x accumulation 2 == 1 x batch 8 x 1 == 1 x batch 4 x 2, after 4 steps."""
    ev = runs.events(name)
    assert ev[-1]["status"] == "completed", runs.proc.stdout[-3000:] + runs.proc.stderr[-3000:]
    start = next(e for e in ev if e["type"] == "start")
    assert start["model"]["world_size"] == 2 and start["model"]["distributed"] == name
    at4 = adapter(runs.checkpoint(name))
    for ref in ("8x1", "4x2"):
        one = adapter(runs.refs[ref][1].run_dir / ("final" if ref == "8x1" else "checkpoints/step-000004"))
        assert max_diff(at4, one, f"{name}, 2 x batch 2 x accumulation 2 vs 1 x {ref}") < SGD_ATOL, ref
    ref_steps = steps(runs.refs["8x1"][0])
    for e in ev:
        if e["type"] == "step" and e["step"] <= 4:
            assert e["loss"] == pytest.approx(ref_steps[e["step"]].loss, abs=1e-5)
            assert e["learning_rate"] == ref_steps[e["step"]].learning_rate
            assert e["tokens"] == ref_steps[e["step"]].tokens  # both processes' tokens
            assert len(e["mem_peak_mb_ranks"]) == 2 and e["mem_peak_mb"] == max(e["mem_peak_mb_ranks"])
    # Eval (each process half the eval set) and sample (rank 0 under DDP, both in step under FSDP).
    ref_eval, ref_sample = of(runs.refs["8x1"][0], "eval")[0], of(runs.refs["8x1"][0], "sample")[0]
    (ev_eval,), (ev_sample,) = (
        [e for e in ev if e["type"] == "eval"],
        [e for e in ev if e["type"] == "sample"],
    )
    assert ev_eval["step"] == 2 and ev_eval["eval_loss"] == pytest.approx(ref_eval.eval_loss, abs=1e-5)
    assert ev_sample["step"] == 2 and ev_sample["text"] == ref_sample.text


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_live_changes_are_applied_alike_on_every_process(runs, name):
    """LR, scheduler, accumulation and optimizer changes at steps 4 and 5: the processes end with the same
    weights, which equal the one-process run's with the same changes at the same steps."""
    ev, (ref_ev, ref) = runs.events(name), runs.refs["4x2"]
    changes = [(e["step"], e["changes"]) for e in ev if e["type"] == "change"]
    assert changes == [(c.step, c.changes) for c in of(ref_ev, "change")] and len(changes) == 2
    ref_steps = steps(ref_ev)
    got = {e["step"]: e for e in ev if e["type"] == "step"}
    assert sorted(got) == sorted(ref_steps) == list(range(1, 8))
    for s, e in got.items():
        assert e["learning_rate"] == pytest.approx(ref_steps[s].learning_rate, rel=1e-12), s
        assert e["gradient_accumulation_steps"] == ref_steps[s].gradient_accumulation_steps
        assert e["loss"] == pytest.approx(ref_steps[s].loss, abs=1e-4), s
    final = adapter(Path(ev[-1]["output"]))
    assert max_diff(final, adapter(ref.run_dir / "final"), f"{name}, live changes vs 1 process") < ADAM_ATOL
    if name == "ddp":  # each process holds the whole model: bit for bit the same
        a, b = runs.params(name, 0), runs.params(name, 1)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert {runs.rank(name, r)["status"] for r in (0, 1)} == {"completed"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_checkpoint_of_two_processes_resumes_on_one(runs, name, tmp_path):
    ckpt = Path(shutil.copytree(runs.checkpoint(name), tmp_path / "start"))  # its own run folder
    _, state = checkpoint.read_state(ckpt)
    assert state["world_size"] == 2 and state["plan"]["batch_size"] == 4 and state["step"] == 4
    rng = checkpoint.read_rng(ckpt)
    assert len(rng["ranks"]) == 2 and not torch.equal(rng["ranks"][0]["cpu"], rng["ranks"][1]["cpu"])
    # The one-process layout: parameters numbered in the optimizer's order.
    groups = checkpoint.read_optimizer(ckpt)["param_groups"]
    assert [i for g in groups for i in g["params"]] == list(range(len(adapter(ckpt))))
    events, t = run(None, at=commands({0: LIVE[4][1:], 5: LIVE[5]}), resume_from=ckpt)
    assert t.cfg.train.per_device_train_batch_size == 4 and t.dist.world_size == 1
    (warning,) = [w for w in of(events, "warning") if w.message.startswith("resumed on")]
    assert warning.message.startswith(
        "resumed on 1 process(es) a run of 2: per_device_train_batch_size 2 -> 4"
    )
    two = {e["step"]: e for e in runs.events(name) if e["type"] == "step"}
    for s, e in steps(events).items():
        assert e.learning_rate == two[s]["learning_rate"] and e.loss == pytest.approx(
            two[s]["loss"], abs=1e-4
        )
    assert sorted(steps(events)) == [5, 6, 7]
    assert (
        max_diff(
            adapter(t.run_dir / "final"),
            adapter(Path(runs.events(name)[-1]["output"])),
            f"{name}, resumed 2 -> 1 vs 2 throughout",
        )
        < RESUME_ATOL
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["one_to_two_ddp", "one_to_two_fsdp"])
def test_checkpoint_of_one_process_resumes_on_two(runs, name):
    ev, (ref_ev, ref) = runs.events(name), runs.refs["4x2"]
    assert ev[-1]["status"] == "completed"
    (warning,) = [e for e in ev if e["type"] == "warning" and e["message"].startswith("resumed on")]
    assert "2 process(es) a run of 1: per_device_train_batch_size 4 -> 2" in warning["message"]
    ref_steps = steps(ref_ev)
    got = {e["step"]: e for e in ev if e["type"] == "step"}
    assert sorted(got) == [5, 6, 7]
    for s, e in got.items():
        assert e["learning_rate"] == ref_steps[s].learning_rate
        assert e["loss"] == pytest.approx(ref_steps[s].loss, abs=1e-4)
    assert (
        max_diff(adapter(Path(ev[-1]["output"])), adapter(ref.run_dir / "final"), f"{name}, resumed 1 -> 2")
        < RESUME_ATOL
    )


@pytest.mark.slow
def test_each_process_has_its_dropout_stream_and_a_resume_restores_each(runs):
    """With dropout, 2 -> 2 continues bit for bit: each process's RNG comes back from the checkpoint."""
    full, resumed = runs.events("dropout"), runs.events("dropout_resumed")
    assert runs.rank("dropout", 0)["rng"] != runs.rank("dropout", 1)["rng"]
    a = {e["step"]: e["loss"] for e in full if e["type"] == "step"}
    b = {e["step"]: e["loss"] for e in resumed if e["type"] == "step"}
    assert sorted(b) == [4, 5, 6] and all(b[s] == a[s] for s in b)
    assert runs.rank("dropout_resumed", 1)["rng"] == runs.rank("dropout", 1)["rng"]
    f, g = runs.params("dropout", 1), runs.params("dropout_resumed", 1)
    assert all(torch.equal(f[k], g[k]) for k in f)


@pytest.mark.slow
def test_full_fine_tuning_under_fsdp_saves_the_one_process_file_and_resumes_on_one(runs, tmp_path):
    ev = runs.events("full_fsdp")
    ckpt = runs.root / "full_fsdp" / "runs" / "run" / "checkpoints" / "step-000002"
    events, t = run(None, resume_from=Path(shutil.copytree(ckpt, tmp_path / "start")))
    mine, theirs = (
        load_file(t.run_dir / "final" / "model.safetensors"),
        load_file(Path(ev[-1]["output"]) / "model.safetensors"),
    )
    # The tied head is written once, as save_pretrained writes it in one process.
    assert sorted(mine) == sorted(theirs) and "lm_head.weight" not in theirs
    assert max_diff(mine, theirs) < SGD_ATOL
    (three,) = [e for e in ev if e["type"] == "step" and e["step"] == 3]
    assert steps(events)[3].loss == pytest.approx(three["loss"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rollback_ddp", "rollback_fsdp"])
def test_rollback_on_two_processes_equals_one(runs, name):
    """A rollback restores every process (under FSDP2 into the shards); rank 0 alone moves the branch."""
    ev, (ref_ev, ref) = runs.events(name), runs.refs["rollback"]
    assert ev[-1]["status"] == "completed"
    (rb,) = [e for e in ev if e["type"] == "rollback"]
    (ref_rb,) = of(ref_ev, "rollback")
    assert (rb["from_step"], rb["to_step"], rb["checkpoint"], rb["branch"]) == (3, 2, "step-000002", 1)
    assert (ref_rb.from_step, ref_rb.to_step, ref_rb.branch) == (3, 2, 1)
    got = [(e["step"], e["learning_rate"]) for e in ev if e["type"] == "step"]
    assert got == [(s.step, s.learning_rate) for s in of(ref_ev, "step")]
    assert [e["loss"] for e in ev if e["type"] == "step"] == pytest.approx(
        [s.loss for s in of(ref_ev, "step")], abs=1e-4
    )
    run_dir = Path(ev[-1]["output"]).parent
    branch = json.loads((run_dir / "branches" / "1" / "branch.json").read_text())
    assert branch["from_step"] == 3 and branch["moved"] == [] and not (run_dir / "branches" / "2").exists()
    assert (
        max_diff(adapter(run_dir / "final"), adapter(ref.run_dir / "final"), f"{name} on 2 vs 1 process")
        < ADAM_ATOL
    )


@pytest.mark.slow
def test_cancel_ends_every_process(runs):
    ev = runs.events("cancel")
    assert ev[-1]["status"] == "cancelled" and ev[-1]["step"] == 2
    assert {runs.rank("cancel", r)["status"] for r in (0, 1)} == {"cancelled"}
    assert not list((runs.root / "cancel" / "runs").glob("*/final"))


@pytest.mark.slow
def test_out_of_memory_in_one_process_ends_the_run_with_its_error(runs):
    ev = runs.events("oom")
    error = [e for e in ev if e["type"] == "error"][-1]
    assert error["message"] == "process 1 of 2 failed: out of memory at step 3" and error["kind"] == "oom"
    assert "per_device_train_batch_size" in error["advice"]
    assert ev[-1]["type"] == "end" and ev[-1]["status"] == "failed"
    assert runs.proc.returncode != 0 and "rank      : 1" in runs.proc.stderr


# ------------------------------------------------------------------ tunedeck-train --nproc-per-node 2


def start_cli(tmp_path: Path, *sets: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "20"}
    cmd = [
        PY, "-m", "tunedeck.engine.cli", "--nproc-per-node", "2", "--output-dir", str(tmp_path),
        "--set", "train.run_name=r", "--set", "train.per_device_train_batch_size=2",
        "--set", "train.eval_steps=0", "--set", "train.save_steps=0", "--set", "data.max_length=64",
    ]  # fmt: skip
    for s in sets:
        cmd += ["--set", s]
    return subprocess.Popen(
        cmd,
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for(path: Path, test, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            events = [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]
            if test(events):
                return events
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting on {path}")


def worker_pids(proc: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the processes torchrun started under ``proc``."""
    out = {}
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            env = p.environ()
        except (psutil.Error, OSError):
            continue
        if "RANK" in env and "tunedeck.engine.cli" in " ".join(p.cmdline()):
            out[int(env["RANK"])] = p.pid
    return out


@pytest.mark.slow
def test_a_killed_process_ends_the_run_with_an_error_on_the_other(tmp_path):
    proc = start_cli(tmp_path, "train.max_steps=400")
    metrics = tmp_path / "r" / "metrics.jsonl"
    try:
        wait_for(metrics, lambda ev: sum(e["type"] == "step" for e in ev) >= 2, 240)
        pids = worker_pids(proc)
        assert sorted(pids) == [0, 1]
        os.kill(pids[1], signal.SIGKILL)
        killed = time.monotonic()
        ev = wait_for(metrics, lambda ev: ev[-1]["type"] == "end", 30)
        took = time.monotonic() - killed
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    error = [e for e in ev if e["type"] == "error"][-1]
    assert error["message"].startswith("another process of the run stopped answering"), error
    print(f"a killed process: error and end from rank 0 {took:.1f} s after the SIGKILL")
    assert ev[-1]["status"] == "failed" and took < 30
    assert proc.returncode != 0 and "Signal 9 (SIGKILL)" in out
    assert not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == psutil.STATUS_ZOMBIE
