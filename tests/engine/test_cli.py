"""tunedeck-train end to end, called in-process (its own process is tested where that is the point:
the installed command in test_packaging, signals in the fault tests)."""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.engine.helpers import CliRun
from tunedeck.engine import cli


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_demo_run_completes_and_writes_the_run_folder(tmp_path, capsys):
    before = signal.getsignal(signal.SIGINT)
    code, out, err = run_cli(
        capsys, "--output-dir", str(tmp_path), "--set", "train.max_steps=5", "--set", "train.run_name=r"
    )
    assert code == 0, err
    assert signal.getsignal(signal.SIGINT) is before  # the CLI gives the handler back
    lines = out.splitlines()
    run_line = next(i for i, x in enumerate(lines) if x.startswith("run r:"))
    assert "float32 on cpu (1 thread); " in lines[run_line]  # conftest sets torch to 1 thread
    assert lines[run_line + 1] == "sdpa attention, adamw_torch optimizer"
    assert "step 5/5 loss" in out and "completed at step 5" in out
    run = tmp_path / "r"
    assert (run / "final" / "adapter_model.safetensors").is_file()
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3, 4, 5]


def test_bad_config_exits_2_with_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--output-dir", str(tmp_path), "--set", "train.learning_rate=-1")
    assert code == 2
    assert err.strip().splitlines() == [
        "tunedeck-train: error: train.learning_rate=-1.0 is out of range "
        "(train.learning_rate must be > 0 and < 1 (typical LoRA: 1e-4 to 3e-4))"
    ]
    code, _, err = run_cli(capsys, str(tmp_path / "none.yaml"))
    assert (
        code == 2
        and err.strip()
        == f"tunedeck-train: error: config file {tmp_path / 'none.yaml'} does not exist (check the path)"
    )


def test_missing_dataset_exits_with_one_line_and_no_run_folder(tmp_path, capsys):
    code, out, err = run_cli(
        capsys, "--output-dir", str(tmp_path), "--set", f"data.path={tmp_path}/gone.jsonl"
    )
    assert code == 2
    assert err.splitlines() == [
        f"tunedeck-train: error: dataset file {tmp_path}/gone.jsonl does not exist "
        "(choose an existing file, a hub dataset owner/name, or builtin:demo)"
    ]
    assert out == ""
    assert not any(tmp_path.iterdir())


def test_control_file_changes_the_learning_rate_live(tmp_path, capsys):
    control = tmp_path / "control.jsonl"
    args = ["--output-dir", str(tmp_path), "--set", "train.max_steps=300", "--set", "train.run_name=r"]
    args += [
        "--set",
        "train.lr_scheduler_type=constant",
        "--set",
        "train.warmup_ratio=0",
        "--control",
        str(control),
    ]
    run = CliRun(args, tmp_path / "r")
    events = run.events
    deadline = time.monotonic() + 120  # for both waits
    run.wait_for(lambda ev: any(e["type"] == "step" and e["step"] >= 3 for e in ev), deadline)
    with open(control, "a") as f:
        f.write("not json\n")
        f.write(json.dumps({"cmd": "set", "learning_rate": 5e-4}) + "\n")
    run.wait_for(lambda ev: any(e["type"] == "change" for e in ev), deadline)
    with open(control, "a") as f:
        f.write(json.dumps({"cmd": "stop"}) + "\n")
    code = run.join(120)
    out = capsys.readouterr().out
    assert code == 0
    assert f"error: control: line 1 of {control} is not JSON (Expecting value); ignored: not json" in out
    bad = next(e for e in events() if e["type"] == "error")
    assert bad["message"] == f"control: line 1 of {control} is not JSON (Expecting value); ignored: not json"
    change = next(e for e in events() if e["type"] == "change")
    assert change["changes"] == {"learning_rate": [0.003, 0.0005]} and change["source"] == "user"
    lrs = {e["step"]: e["learning_rate"] for e in events() if e["type"] == "step"}
    n = change["step"]
    assert lrs[n] == pytest.approx(3e-3) and lrs[n + 1] == pytest.approx(5e-4)
    assert "stopped at step" in out and (tmp_path / "r" / "checkpoints").is_dir()


def test_resume_from_the_cli(tmp_path, capsys):
    args = ["--output-dir", str(tmp_path), "--set", "train.max_steps=6", "--set", "train.save_steps=3"]
    code, first, err = run_cli(capsys, *args, "--set", "train.run_name=r")
    assert code == 0, err
    code, again, err = run_cli(capsys, "--resume", str(tmp_path / "r" / "checkpoints" / "step-000003"))
    assert code == 0, err

    def losses(text: str) -> dict[int, str]:
        return {
            int(x.split()[1].split("/")[0]): x.split()[3] for x in text.splitlines() if x.startswith("step ")
        }

    a, b = losses(first), losses(again)
    assert sorted(b) == [4, 5, 6] and all(a[s] == b[s] for s in b)


@pytest.mark.slow
def test_control_file_rolls_back_with_a_new_learning_rate(tmp_path, capsys):
    control = tmp_path / "control.jsonl"
    args = ["--output-dir", str(tmp_path), "--set", "train.max_steps=12", "--set", "train.run_name=r"]
    args += [
        "--set",
        "train.save_steps=2",
        "--set",
        "train.lr_scheduler_type=constant",
        "--control",
        str(control),
    ]
    run = CliRun(args, tmp_path / "r")
    events = run.events
    run.wait_for(lambda ev: any(e["type"] == "step" and e["step"] >= 3 for e in ev))
    with open(control, "a") as f:
        f.write(
            json.dumps({"cmd": "rollback", "checkpoint": "step-000002", "set": {"learning_rate": 1e-3}})
            + "\n"
        )
    code = run.join(120)
    out = capsys.readouterr().out
    assert code == 0
    rb = next(e for e in events() if e["type"] == "rollback")
    n = rb["from_step"]
    assert (rb["to_step"], rb["branch"]) == (2, 1)
    assert f"rollback from step {n} to step-000002 (step 2); steps 3-{n} kept as branch 1" in out
    assert f"change after step 2 (user): step {n} -> 2, learning_rate 0.003 -> 0.001" in out
    lrs = [(e["step"], e["learning_rate"]) for e in events() if e["type"] == "step"]
    assert lrs[n:] == [(s, pytest.approx(1e-3)) for s in range(3, 13)]
