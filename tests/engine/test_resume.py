"""Checkpoints: resume equals an uninterrupted run; the adapter loads with plain peft."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.engine.helpers import make_cfg, of, run, steps
from tunedeck.engine import builtin, checkpoint, durable
from tunedeck.engine.protocol import Set, Stop


def test_resume_continues_exactly(tmp_path):
    # Dropout on, so the RNG state must be restored too; a live change before the checkpoint must hold.
    kw = dict(train__max_steps=8, lora__dropout=0.1, train__lr_scheduler_type="cosine", train__warmup_steps=2)
    at = {2: [Set({"learning_rate": 1e-3, "gradient_accumulation_steps": 2})]}
    full, _ = run(make_cfg(tmp_path / "full", **kw), at=at)
    # Stopped after step 3 (a checkpoint and final/ of step 3): its newest state, so it resumes in place.
    part, t = run(make_cfg(tmp_path / "part", **kw), at={**at, 3: [Stop()]})
    ckpt = t.run_dir / "checkpoints" / "step-000003"
    assert ckpt.is_dir() and part[-1].status == "stopped"
    # The run was made from scratch again: only what the checkpoint holds can make it equal.
    resumed, r = run(None, resume_from=ckpt)
    assert r.run_dir == t.run_dir and of(resumed, "start")[0].parent is None  # same folder, metrics appended
    a, b = steps(full), steps(resumed)
    assert sorted(b) == list(range(4, max(a) + 1))
    for s in b:
        assert b[s].loss == a[s].loss, s
        assert b[s].learning_rate == a[s].learning_rate
        assert b[s].gradient_accumulation_steps == 2
    start = of(resumed, "start")[0]
    assert start.step == 3 and start.changes[0]["changes"]["learning_rate"] == [3e-3, 1e-3]


def test_checkpoint_is_atomic_and_complete(tmp_path):
    _, t = run(make_cfg(tmp_path, train__max_steps=4, train__save_steps=2))
    ckpt = t.run_dir / "checkpoints" / "step-000002"
    names = {p.name for p in ckpt.iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "optimizer.pt",
        "rng_state.pt",
        "trainer_state.json",
        "config.yaml",
        "tokenizer.json",
    } <= names
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".tmp")]
    cfg, state = checkpoint.read_state(ckpt)
    assert state["step"] == 2 and state["plan"]["seen"] == 2 * 4 and cfg.train.max_steps == 4


def test_failed_write_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    _, t = run(make_cfg(tmp_path, train__max_steps=2))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    target = t.run_dir / "checkpoints" / "step-000002"
    with pytest.raises(durable.WriteFailed, match="^OSError: disk full$"):
        checkpoint.write(
            target, model=t.model, tokenizer=t.tokenizer, cfg=t.cfg, state={}, optimizer=t.optimizer
        )
    assert not target.exists()
    assert not list(target.parent.glob(".tmp-*"))


def test_adapter_loads_with_plain_peft(tmp_path):
    _, t = run(make_cfg(tmp_path, train__max_steps=5))
    base = AutoModelForCausalLM.from_pretrained(builtin.tiny_model_dir())
    loaded = PeftModel.from_pretrained(base, t.run_dir / "final").eval()
    t.model.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, t.model(ids).logits, atol=1e-6)
        # and the adapter did train: it differs from the base model
        with loaded.disable_adapter():
            base_logits = loaded(ids).logits
        assert not torch.allclose(loaded(ids).logits, base_logits, atol=1e-4)


def test_full_finetune_saves_safetensors_and_resumes(tmp_path):
    kw = dict(lora__enabled=False, train__max_steps=4, train__learning_rate=1e-4)
    full, _ = run(make_cfg(tmp_path / "full", **kw))
    _, t = run(make_cfg(tmp_path / "part", train__save_steps=2, **kw))
    ckpt = t.run_dir / "checkpoints" / "step-000002"
    assert (ckpt / "model.safetensors").is_file() and not (ckpt / "adapter_model.safetensors").exists()
    resumed, _ = run(None, resume_from=ckpt)
    assert [e.loss for e in of(resumed, "step")] == [e.loss for e in of(full, "step")][2:]


def test_a_failed_save_is_an_error_event_and_training_goes_on(tmp_path, monkeypatch):
    from tunedeck.engine import checkpoint as ck

    real = ck.write

    def flaky(folder, **kw):
        if folder.name == "step-000002":
            raise OSError(28, "No space left on device")
        return real(folder, **kw)

    monkeypatch.setattr(ck, "write", flaky)
    events, t = run(make_cfg(tmp_path, train__max_steps=4, train__save_steps=2))
    err = of(events, "error")[0]
    assert err.message.startswith(
        f"could not save {t.run_dir}/checkpoints/step-000002: no space left on device: "
    )
    assert [e.step for e in of(events, "step")] == [1, 2, 3, 4]
    assert events[-1].status == "completed" and (t.run_dir / "final" / "adapter_model.safetensors").is_file()
