"""Bad input and faults: one clear line, the right kind, nothing lost or half-written."""

import json

import pytest
import torch

from tests.engine.helpers import make_cfg, of, run
from tunedeck.engine import config as config_mod
from tunedeck.engine.errors import ConfigError
from tunedeck.engine.session import TrainingSession


def failure(events):
    err = of(events, "error")
    end = events[-1]
    assert end.type == "end" and end.status == "failed"
    assert err, "a failed run reports an error"
    return err[0]


@pytest.mark.parametrize(
    "overrides, kind, text",
    [
        ({"data__path": "/nope/train.jsonl"}, "data", "/nope/train.jsonl"),
        ({"model__name_or_path": "/nope/model"}, "model", "model folder /nope/model does not exist"),
        ({"model__load_in_4bit": True}, "config", "model.load_in_4bit=true needs a CUDA GPU"),
        ({"train__optim": "paged_adamw_32bit"}, "config", "paged_adamw_32bit needs a CUDA GPU"),
        (
            {"train__torch_compile": True, "train__torch_compile_backend": "cudagraphs"},
            "config",
            "train.torch_compile_backend=cudagraphs needs a CUDA GPU",
        ),
        (
            {"train__torch_compile": True, "train__torch_compile_mode": "reduce-overhead"},
            "config",
            "train.torch_compile_mode=reduce-overhead needs a CUDA GPU",
        ),
        ({"data__max_length": 8, "data__path": "LONG"}, "data", "max_length"),
    ],
)
def test_setup_errors_are_one_line_and_leave_no_run_folder(tmp_path, overrides, kind, text):
    if overrides.get("data__path") == "LONG":
        f = tmp_path / "long.jsonl"
        f.write_text(json.dumps({"prompt": "a very long prompt " * 3, "completion": "and its answer"}) + "\n")
        overrides["data__path"] = str(f)
    events, _ = run(make_cfg(tmp_path, **overrides))
    err = failure(events)
    assert err.kind == kind and text in err.message and "\n" not in err.message
    assert err.advice
    assert not (tmp_path / "runs").exists()


def test_not_a_causal_lm(tmp_path):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    BertModel(
        BertConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=99
        )
    ).save_pretrained(folder)
    events, _ = run(make_cfg(tmp_path, model__name_or_path=str(folder)))
    err = failure(events)
    assert err.kind == "model" and "holds a BertModel, not a causal language model" in err.message


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.optim=adam", "train.optim='adam' is not a known choice"),
        ("train.lr_scheduler_type=exp", "train.lr_scheduler_type='exp' is not a known choice"),
        ("train.learning_rate=0", "train.learning_rate=0.0 is out of range"),
        ("train.learning_rate=-3e-4", "train.learning_rate=-0.0003 is out of range"),
        ("train.gradient_accumulation_steps=0", "train.gradient_accumulation_steps=0 is out of range"),
        ("train.per_device_train_batch_size=two", "is not a whole number"),
        ("lora.dropout=1.5", "lora.dropout=1.5 is out of range"),
        ("train.lr=1e-4", "unknown key train.lr"),
        ("optimizer.name=x", "unknown section 'optimizer'"),
    ],
)
def test_bad_config_values_name_key_value_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as e:
        config_mod.apply_overrides(config_mod.Config(), [override])
    assert message in e.value.message
    assert e.value.advice


def test_a_compile_mode_needs_the_inductor_backend():
    with pytest.raises(ConfigError) as e:
        config_mod.apply_overrides(
            config_mod.Config(),
            ["train.torch_compile_backend=aot_eager", "train.torch_compile_mode=max-autotune"],
        )
    assert e.value.one_line() == (
        "train.torch_compile_mode=max-autotune is a mode of the inductor backend, not of aot_eager "
        "(set train.torch_compile_backend=inductor, or train.torch_compile_mode=default)"
    )


def test_yaml_errors_name_the_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  learning_rate: 1e-4\n  optim: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML at line \d"):
        config_mod.load(f)


def test_yaml_round_trip_and_presets(tmp_path):
    cfg = config_mod.apply_overrides(
        config_mod.Config(), ["train.learning_rate=2e-4", "lora.target_modules=all-linear"]
    )
    config_mod.save(cfg, tmp_path / "c.yaml")
    assert config_mod.load(tmp_path / "c.yaml") == cfg
    demo = config_mod.load(config_mod.Path(__file__).resolve().parents[2] / "resources/presets/demo.yaml")
    assert demo.model.name_or_path == "builtin:tiny"
    q = config_mod.load(
        config_mod.Path(__file__).resolve().parents[2] / "resources/presets/course-qlora.yaml"
    )
    assert (
        q.model.load_in_4bit,
        q.lora.r,
        q.lora.alpha,
        q.lora.dropout,
        q.train.optim,
        q.train.learning_rate,
        q.train.lr_scheduler_type,
        q.train.warmup_ratio,
        q.train.per_device_train_batch_size,
        q.train.gradient_accumulation_steps,
        q.train.num_train_epochs,
    ) == (True, 32, 64, 0.1, "paged_adamw_32bit", 1e-4, "cosine", 0.03, 4, 1, 1.0)
    assert q.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_oom_is_reported_with_advice_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from tunedeck.engine.trainer import Trainer

    real = Trainer._optimizer_step

    def step(self):
        if self.step == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self)

    monkeypatch.setattr(Trainer, "_optimizer_step", step)
    events, t = run(make_cfg(tmp_path, train__max_steps=10, train__save_steps=2))
    err = failure(events)
    assert err.kind == "oom" and err.message == "out of memory at step 4"
    assert "gradient_accumulation_steps" in err.advice and "load_in_4bit" in err.advice
    ckpt = t.run_dir / "checkpoints" / "step-000002"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()
    assert not (t.run_dir / "final").exists()


def test_nan_loss_pauses_without_touching_the_weights(tmp_path, monkeypatch):
    from tunedeck.engine.protocol import Cancel

    cfg = make_cfg(tmp_path, train__max_steps=10)
    holder = {}

    def poison(module, args, output):
        if holder["t"].step == 2:
            output.loss = output.loss * float("nan")
        return output

    from tunedeck.engine.trainer import Trainer

    real_setup = Trainer.setup

    def setup(self):
        real_setup(self)
        holder["t"] = self
        holder["before"] = {
            n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad
        }
        self.model.register_forward_hook(poison)

    monkeypatch.setattr(Trainer, "setup", setup)
    seen = []

    def at_pause(e):
        seen.append(e)
        if e.type == "state" and e.state == "paused":
            t = holder["t"]
            holder["at_pause"] = {
                n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad
            }
            t.commands.put(Cancel())

    import queue

    t = Trainer(cfg, at_pause, queue.Queue())
    end = t.run()
    warn = [e for e in seen if e.type == "warning"][0]
    assert warn.kind == "nan" and "not finite" in warn.message and "step 3" in warn.message
    assert end.status == "cancelled" and end.step == 2
    # the poisoned step did not reach the weights
    params = dict(t.model.named_parameters())
    for n, p in holder["at_pause"].items():
        assert torch.isfinite(p).all() and torch.equal(p, params[n].detach())


def test_engine_exception_becomes_error_and_end_in_the_session(tmp_path, monkeypatch):
    from tunedeck.engine.trainer import Trainer

    def broken(self):
        raise RuntimeError("something internal broke")

    monkeypatch.setattr(Trainer, "train", broken)
    s = TrainingSession(make_cfg(tmp_path))
    s.start()
    assert s.join(timeout=60)
    events = s.drain()
    err = [e for e in events if e.type == "error"][0]
    assert err.kind == "internal" and "RuntimeError: something internal broke" in err.message
    assert events[-1].type == "end" and events[-1].status == "failed"


def test_malformed_commands_become_error_events(tmp_path):
    s = TrainingSession(make_cfg(tmp_path))
    s.send({"cmd": "jump"})
    s.send({"cmd": "sample", "prompt": 3})
    s.send({"learning_rate": 1e-4})
    msgs = [e.message for e in s.drain()]
    assert msgs == [
        "unknown command 'jump'",
        "sample prompt must be text",
        "a command must be an object with a 'cmd' key, got {'learning_rate': 0.0001}",
    ]
