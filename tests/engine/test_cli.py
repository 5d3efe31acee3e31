"""tunedeck-train end to end, as a user runs it."""

import json
import subprocess
import sys

CLI = [sys.executable, "-m", "tunedeck.engine.cli"]


def run_cli(*args, timeout=180):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_demo_run_completes_and_writes_the_run_folder(tmp_path):
    out = run_cli("--output-dir", str(tmp_path), "--set", "train.max_steps=5", "--set", "train.run_name=r")
    assert out.returncode == 0, out.stderr
    assert "step 5/5 loss" in out.stdout
    assert out.stdout.splitlines()[1] == "sdpa attention, adamw_torch optimizer"  # after the run line
    assert "completed at step 5" in out.stdout
    run = tmp_path / "r"
    assert (run / "final" / "adapter_model.safetensors").is_file()
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3, 4, 5]


def test_bad_config_exits_2_with_one_line(tmp_path):
    out = run_cli("--output-dir", str(tmp_path), "--set", "train.learning_rate=-1")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "tunedeck-train: error: train.learning_rate=-1.0 is out of range "
        "(train.learning_rate must be > 0 and < 1 (typical LoRA: 1e-4 to 3e-4))"
    ]
    missing = run_cli(str(tmp_path / "none.yaml"))
    assert (
        missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    )
    cuda = run_cli("--set", "train.optim=adamw_8bit")
    assert cuda.returncode == 2 and "needs a CUDA GPU" in cuda.stderr


def test_missing_dataset_exits_1_without_traceback(tmp_path):
    out = run_cli("--output-dir", str(tmp_path), "--set", f"data.path={tmp_path}/gone.jsonl")
    assert out.returncode == 1
    assert (
        "error: " in out.stdout and "gone.jsonl" in out.stdout and "Traceback" not in out.stdout + out.stderr
    )
    assert not any(tmp_path.iterdir())


def test_control_file_changes_the_learning_rate_live(tmp_path):
    control = tmp_path / "control.jsonl"
    proc = subprocess.Popen(
        [
            *CLI,
            "--output-dir",
            str(tmp_path),
            "--set",
            "train.max_steps=300",
            "--set",
            "train.run_name=r",
            "--set",
            "train.lr_scheduler_type=constant",
            "--set",
            "train.warmup_ratio=0",
            "--control",
            str(control),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 3/"):
                with open(control, "a") as f:
                    f.write("not json\n")
                    f.write(json.dumps({"cmd": "set", "learning_rate": 5e-4}) + "\n")
            if line.startswith("change after step"):
                with open(control, "a") as f:
                    f.write(json.dumps({"cmd": "stop"}) + "\n")
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines)
    assert proc.returncode == 0, proc.stderr.read()
    assert "control: ignored a line that is not JSON" in text
    change = [x for x in lines if x.startswith("change after step")][0]
    assert change.strip().endswith("(user): learning_rate 0.003 -> 0.0005")
    n = int(change.split()[3])
    after = [x for x in lines if x.startswith(f"step {n + 1}/")][0]
    assert "lr 5.000e-04" in after
    before = [x for x in lines if x.startswith(f"step {n}/")][0]
    assert "lr 3.000e-03" in before
    assert "stopped at step" in text
    assert (tmp_path / "r" / "checkpoints").is_dir()


def test_resume_from_the_cli(tmp_path):
    first = run_cli(
        "--output-dir",
        str(tmp_path),
        "--set",
        "train.max_steps=6",
        "--set",
        "train.save_steps=3",
        "--set",
        "train.run_name=r",
    )
    assert first.returncode == 0, first.stderr
    again = run_cli("--resume", str(tmp_path / "r" / "checkpoints" / "step-000003"))
    assert again.returncode == 0, again.stderr
    a = {
        int(x.split()[1].split("/")[0]): x.split()[3]
        for x in first.stdout.splitlines()
        if x.startswith("step ")
    }
    b = {
        int(x.split()[1].split("/")[0]): x.split()[3]
        for x in again.stdout.splitlines()
        if x.startswith("step ")
    }
    assert sorted(b) == [4, 5, 6] and all(a[s] == b[s] for s in b)
