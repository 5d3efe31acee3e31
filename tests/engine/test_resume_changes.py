"""Resuming with new values: live ones applied at the resume step, the rest refused in one line; a
checkpoint older than its run's newest files starts a new run folder that names its parent."""

import json
import shutil

import pytest

from tests.engine.helpers import make_cfg, of, run, steps
from tunedeck.engine import checkpoint, cli, resume
from tunedeck.engine import config as config_mod
from tunedeck.engine.config import LIVE_KEYS
from tunedeck.engine.errors import ConfigError
from tunedeck.engine.protocol import Set, Stop
from tunedeck.engine.session import TrainingSession

KW = dict(
    data__max_length=64,
    train__max_steps=6,
    train__save_steps=3,
    lora__dropout=0.1,
    train__lr_scheduler_type="cosine",
)
LIVE = ", ".join((*LIVE_KEYS, "autopilot"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 6-step run with checkpoints at steps 3 and final/ at 6; tests copy it."""
    root = tmp_path_factory.mktemp("finished")
    _, t = run(make_cfg(root, train__run_name="r", **KW))
    return t.run_dir


@pytest.fixture
def ckpt(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "runs" / "r")
    return tmp_path / "runs" / "r" / "checkpoints" / "step-000003"


def asked(ckpt, *sets):
    return config_mod.apply_overrides(checkpoint.read_config(ckpt), list(sets))


def refusal(ckpt, *sets):
    with pytest.raises(ConfigError) as e:
        resume.prepare(ckpt, asked(ckpt, *sets))
    return e.value.one_line()


ADVICE = f"start a new run to change it; resuming takes new live values ({LIVE}) and another output_dir"


@pytest.mark.parametrize(
    "override, what",
    [
        ("data.max_length=32", "data.max_length (64 -> 32: changes the data)"),
        ("train.seed=7", "train.seed (42 -> 7: changes the data order)"),
        ("data.path=other.jsonl", "data.path (builtin:demo -> other.jsonl: changes the data)"),
        ("data.format=text", "data.format (auto -> text: changes the data)"),
        ("data.eval_fraction=0.2", "data.eval_fraction (0.05 -> 0.2: changes the data)"),
        ("lora.r=8", "lora.r (32 -> 8: changes the adapter)"),
        ("model.name_or_path=gpt2", "model.name_or_path (builtin:tiny -> gpt2: changes the model)"),
        ("train.max_steps=10", "train.max_steps (6 -> 10: changes the run's length and schedule)"),
        ("train.warmup_steps=2", "train.warmup_steps (0 -> 2: changes the schedule)"),
    ],
)
def test_values_that_change_the_data_or_the_model_are_refused_with_one_line(ckpt, override, what):
    assert refusal(ckpt, override) == f"a resumed run cannot change {what} ({ADVICE})"


def test_several_refused_values_are_named_in_the_same_line(ckpt):
    assert refusal(ckpt, "lora.r=8", "train.seed=7", "train.learning_rate=1e-3") == (
        "a resumed run cannot change lora.r (32 -> 8: changes the adapter), train.seed (42 -> 7: changes "
        f"the data order) ({ADVICE.replace('change it', 'change them')})"
    )


def test_the_batch_size_is_refused_unless_it_is_live(ckpt):
    if "per_device_train_batch_size" in LIVE_KEYS:
        cfg, r = resume.prepare(ckpt, asked(ckpt, "train.per_device_train_batch_size=2"))
        assert r.apply == {"per_device_train_batch_size": 2} and cfg.train.per_device_train_batch_size == 4
    else:
        assert refusal(ckpt, "train.per_device_train_batch_size=2") == (
            f"a resumed run cannot change train.per_device_train_batch_size (4 -> 2: changes the batches) ({ADVICE})"
        )


def test_live_values_given_anew_equal_a_live_set_at_the_resume_step(tmp_path, ckpt):
    values = {"learning_rate": 1e-3, "lr_scheduler_type": "constant", "gradient_accumulation_steps": 2}
    full, _ = run(make_cfg(tmp_path / "full", **KW), at={3: [Set(values)]})
    sets = [f"train.{k}={v}" for k, v in values.items()] + ["train.logging_steps=2"]
    resumed, r = run(asked(ckpt, *sets), resume_from=ckpt)
    a, b = steps(full), steps(resumed)
    # 3 micro-batches left as windows of 2: steps 4 and 5 (logged: every 2 steps, and the last).
    assert sorted(b) == [4, 5] and max(a) == 5
    for s in (4, 5):
        assert (b[s].loss, b[s].learning_rate) == (a[s].loss, a[s].learning_rate)
    change = of(resumed, "change")[0]
    assert change.source == "resume" and change.step == 3
    assert change.changes == {
        "learning_rate": [3e-3, 1e-3],
        "lr_scheduler_type": ["cosine", "constant"],
        "gradient_accumulation_steps": [1, 2],
        "train.logging_steps": [1, 2],
    }
    # Kept in the change log, so the next checkpoint and a resume from it honour it.
    assert r.change_log[-2]["changes"] == change.changes and r.change_log[-2]["source"] == "resume"
    assert r.cfg.train.learning_rate == 1e-3 and r.cfg.train.logging_steps == 2


def test_optim_sgd_on_resume_is_a_change_not_an_internal_error(tmp_path, ckpt):
    resumed, r = run(asked(ckpt, "train.optim=sgd"), resume_from=ckpt)
    assert resumed[-1].status == "completed" and type(r.optimizer).__name__ == "SGD"
    assert of(resumed, "change")[0].changes == {"optim": ["adamw_torch", "sgd"]}
    assert not of(resumed, "error")


def test_an_earlier_checkpoint_of_a_finished_run_starts_a_new_folder_naming_its_parent(ckpt):
    parent = ckpt.parent.parent
    before = snapshot(parent)
    events, r = run(None, resume_from=ckpt)
    assert r.run_dir == parent.parent / "r-2" and events[-1].status == "completed"
    record = json.loads((r.run_dir / "parent.json").read_text())
    assert record["parent"] == str(parent.resolve()) and record["step"] == 3
    assert record["checkpoint"] == str(ckpt.resolve()) and record["run_id"] == "r"
    assert of(events, "start")[0].parent == str(parent.resolve())
    # Nothing of the parent was touched: every file holds the same bytes.
    assert snapshot(parent) == before and "final/adapter_model.safetensors" in before


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_newest_checkpoint_continues_in_its_own_folder(tmp_path):
    _, t = run(make_cfg(tmp_path, train__run_name="s", **KW), at={4: [Stop()]})
    events, r = run(None, resume_from=t.run_dir / "checkpoints" / "step-000004")
    assert r.run_dir == t.run_dir and not (t.run_dir / "parent.json").exists()
    assert of(events, "start")[0].parent is None


def test_a_checkpoint_missing_a_file_is_refused_before_anything_loads(tmp_path, ckpt, capsys):
    (ckpt / "rng_state.pt").unlink()
    code = cli.main(["--resume", str(ckpt), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        f"tunedeck-train: error: checkpoint {ckpt} is incomplete (no rng_state.pt), so it cannot be resumed "
        "(resume from another checkpoint of the run)"
    ]
    (ckpt / "adapter_model.safetensors").unlink()
    with pytest.raises(
        ConfigError, match=r"\(no rng_state.pt, adapter_model.safetensors or model.safetensors\)"
    ):
        resume.prepare(ckpt, None)


def test_the_cli_refuses_with_one_line_and_exit_2(ckpt, capsys):
    code = cli.main(["--resume", str(ckpt), "--set", "lora.r=8", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        f"tunedeck-train: error: a resumed run cannot change lora.r (32 -> 8: changes the adapter) ({ADVICE})"
    ]


def test_the_cli_honours_output_dir_with_a_new_folder_naming_its_parent(tmp_path, ckpt, capsys):
    code = cli.main(
        [
            "--resume",
            str(ckpt),
            "--output-dir",
            str(tmp_path / "elsewhere"),
            "--set",
            "train.learning_rate=1e-3",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    new = tmp_path / "elsewhere" / "r"
    assert json.loads((new / "parent.json").read_text())["parent"] == str(ckpt.parent.parent.resolve())
    assert f"into a new run folder; its parent run: {ckpt.parent.parent.resolve()}" in out
    assert "change after step 3 (resume): learning_rate 0.003 -> 0.001" in out
    events = [json.loads(x) for x in (new / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["type"] == "step"] == [4, 5, 6]


def test_the_window_resume_through_a_session_follows_the_same_rules(tmp_path, ckpt):
    refused = TrainingSession(asked(ckpt, "train.seed=7"), resume_from=ckpt, system_interval=0)
    refused.start()
    assert refused.join(timeout=60)
    events = refused.drain()
    assert [e.type for e in events] == ["error", "end"] and events[-1].status == "failed"
    assert events[0].message == "a resumed run cannot change train.seed (42 -> 7: changes the data order)"
    live = TrainingSession(asked(ckpt, "train.learning_rate=1e-3"), resume_from=ckpt, system_interval=0)
    live.start()
    assert live.join(timeout=120)
    events = live.drain()
    change = [e for e in events if e.type == "change"][0]
    assert change.source == "resume" and change.changes == {"learning_rate": [3e-3, 1e-3]}
    assert events[-1].status == "completed" and live.run_dir != ckpt.parent.parent
