"""User mistakes are refused before the model loads, with one line and exit status 2; a real bug
leaves its traceback on stderr and in a log file, and says where."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.engine.helpers import make_cfg
from tunedeck.engine import cli, preflight
from tunedeck.engine import model as model_mod
from tunedeck.engine.session import TrainingSession


@pytest.fixture
def no_loading(monkeypatch):
    """Any mistake let through to the model load fails the test loudly."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was refused")

    monkeypatch.setattr(model_mod, "load", load)
    monkeypatch.setattr(model_mod, "load_base", load)


def refused(capsys, tmp_path, *args: str) -> str:
    code = cli.main(["--set", "train.max_steps=2", *args])
    out = capsys.readouterr()
    assert code == 2, out
    assert out.out == ""
    lines = out.err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_output_dir_that_is_a_file(tmp_path, capsys, no_loading):
    f = tmp_path / "runs"
    f.write_text("not a folder")
    assert refused(capsys, tmp_path, "--output-dir", str(f)) == (
        f"tunedeck-train: error: train.output_dir={f} is a file, not a folder "
        "(choose a folder; a missing one is created)"
    )
    below = f / "deeper"
    assert refused(capsys, tmp_path, "--output-dir", str(below)) == (
        f"tunedeck-train: error: train.output_dir={below} is inside {f}, which is a file, not a folder "
        "(choose a folder; a missing one is created)"
    )


def test_output_dir_that_cannot_be_written(tmp_path, capsys, no_loading):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes through permission bits: a read-only mount, for real
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)]).returncode:
            pytest.skip("mount is not allowed here")
        cause = f"is on a read-only file system ({ro})"
    else:
        ro.chmod(0o555)
        cause = f"is not writable (permission denied on {ro})"
    try:
        assert refused(capsys, tmp_path, "--output-dir", str(ro / "runs")) == (
            f"tunedeck-train: error: train.output_dir={ro / 'runs'} {cause} (choose a folder you can write to)"
        )
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)])
        else:
            ro.chmod(0o755)


def test_output_dir_under_proc(tmp_path, capsys, no_loading):
    assert refused(capsys, tmp_path, "--output-dir", "/proc/tunedeck-runs") == (
        "tunedeck-train: error: train.output_dir=/proc/tunedeck-runs is under /proc, a kernel file system "
        "that cannot hold files (choose a folder on a disk, e.g. runs or ~/tunedeck-runs)"
    )


@pytest.mark.parametrize(
    "sets, line",
    [
        (
            ["train.num_train_epochs=inf", "train.max_steps=-1"],
            "train.num_train_epochs=inf is out of range (train.num_train_epochs must be a finite number > 0)",
        ),
        (
            ["train.seed=1e30"],
            "train.seed=1000000000000000019884624838656 is out of range "
            "(train.seed must be a whole number from 0 to 4294967295)",
        ),
        (
            ["train.lr_scheduler_kwargs={num_cycles: abc}", "train.warmup_steps=3"],
            "train.lr_scheduler_kwargs={'num_cycles': 'abc'} does not work with cosine: could not convert "
            "string to float: 'abc' (fix or remove the value (see transformers' get_scheduler))",
        ),
        (
            ["train.lr_scheduler_kwargs={min_lr: 0.1}"],
            "train.lr_scheduler_kwargs has 'min_lr', which the cosine schedule does not take "
            "(cosine takes num_cycles)",
        ),
        (
            ["train.run_name=../../etc"],
            "train.run_name='../../etc' is not a plain folder name (a run folder lies directly in "
            "train.output_dir) (give a name without /, \\ or .., or leave it empty for a time stamp)",
        ),
    ],
    ids=["epochs-inf", "seed-1e30", "scheduler-kwargs-type", "scheduler-kwargs-key", "run-name-escapes"],
)
def test_config_mistakes(tmp_path, capsys, no_loading, sets, line):
    args = ["--output-dir", str(tmp_path / "a" / "b"), "--set", "train.lr_scheduler_type=cosine"]
    for s in sets:
        args += ["--set", s]
    assert refused(capsys, tmp_path, *args) == f"tunedeck-train: error: {line}"
    assert not (tmp_path / "a").exists() and not (tmp_path / "etc").exists()


def test_flash_attention_without_flash_attn(tmp_path, capsys, no_loading):
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed and usable here")
    import torch

    lacks = "the package" if torch.cuda.is_available() else "a CUDA GPU"
    line = refused(
        capsys,
        tmp_path,
        "--output-dir",
        str(tmp_path),
        "--set",
        "model.attn_implementation=flash_attention_2",
    )
    assert line == (
        "tunedeck-train: error: model.attn_implementation=flash_attention_2 needs the flash-attn package and "
        f"a CUDA GPU, and this machine lacks {lacks} (set model.attn_implementation=sdpa, PyTorch's own "
        "fused attention)"
    )


def test_control_path_in_a_missing_folder_or_a_folder(tmp_path, capsys, no_loading):
    gone = tmp_path / "nowhere" / "ctl.jsonl"
    assert refused(capsys, tmp_path, "--output-dir", str(tmp_path), "--control", str(gone)) == (
        f"tunedeck-train: error: --control {gone}: the folder {gone.parent} does not exist "
        "(create it, or give a file in a folder that exists)"
    )
    assert refused(capsys, tmp_path, "--output-dir", str(tmp_path / "o"), "--control", str(tmp_path)) == (
        f"tunedeck-train: error: --control {tmp_path} is a folder, not a file "
        "(give a file name, e.g. control.jsonl)"
    )


def test_every_problem_at_once_for_the_window(tmp_path):
    cfg = make_cfg(
        tmp_path,
        model__name_or_path=str(tmp_path / "no-model"),
        data__path=str(tmp_path / "no.jsonl"),
        train__output_dir="/proc/x",
        train__lr_scheduler_kwargs="{power: 2}",
    )
    assert [e.kind for e in preflight.problems(cfg)] == ["model", "data", "config", "config"]
    with pytest.raises(Exception) as e:
        preflight.check(cfg)
    assert e.value.message == f"model folder {tmp_path / 'no-model'} does not exist"


def test_a_session_started_directly_gets_the_same_refusal_before_loading(tmp_path, no_loading):
    (tmp_path / "file").write_text("x")
    s = TrainingSession(make_cfg(tmp_path, train__output_dir=str(tmp_path / "file")), system_interval=0)
    s.start()
    assert s.join(60)
    events = s.drain()
    assert [(e.type, getattr(e, "kind", None)) for e in events if e.type in ("error", "end")] == [
        ("error", "config"),
        ("end", None),
    ]
    assert events[-1].status == "failed"
    assert "is a file, not a folder" in next(e for e in events if e.type == "error").message


def test_an_internal_error_leaves_its_traceback_before_the_run_folder_exists(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TUNEDECK_CACHE", str(tmp_path / "cache"))

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in loading")

    monkeypatch.setattr(model_mod, "load", broken)
    code = cli.main(["--output-dir", str(tmp_path / "runs")])
    out = capsys.readouterr()
    assert code == 1
    (log,) = (tmp_path / "cache" / "logs").iterdir()
    assert log.name.startswith("error-") and log.suffix == ".log"
    assert "Traceback (most recent call last)" in log.read_text()
    assert log.read_text().rstrip().endswith("RuntimeError: a bug in loading")
    assert "Traceback (most recent call last)" in out.err
    assert (
        "error: internal error: RuntimeError: a bug in loading "
        f"(this is a bug; the traceback is in {log} and on stderr)" in out.out
    )
    assert not (tmp_path / "runs").exists()
