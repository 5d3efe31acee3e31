"""Every live command's effect on the step events that follow it."""

import math

import pytest
import torch

from tests.engine.helpers import make_cfg, of, run, steps
from tunedeck.engine.protocol import Cancel, Eval, Pause, Resume, Sample, SamplingOptions, Save, Set, Stop
from tunedeck.engine.schedule import LRSchedule


def lrs_of(events):
    return {e.step: e.learning_rate for e in of(events, "step")}


def test_learning_rate_change_scales_the_schedule_from_the_next_step(tmp_path):
    cfg = make_cfg(
        tmp_path, train__max_steps=10, train__learning_rate=1e-3, train__lr_scheduler_type="linear"
    )
    base, _ = run(make_cfg(tmp_path / "base", train__max_steps=10, train__learning_rate=1e-3))
    events, _ = run(cfg, at={4: [Set({"learning_rate": 2e-3})]})
    before, after = lrs_of(base), lrs_of(events)
    for s in range(1, 5):
        assert after[s] == before[s]
    for s in range(5, 11):
        assert after[s] == pytest.approx(2 * before[s], rel=1e-12)
    change = of(events, "change")[0]
    assert change.step == 4 and change.changes == {"learning_rate": [1e-3, 2e-3]} and change.source == "user"


def test_scheduler_switch_continues_from_the_current_lr(tmp_path):
    cfg = make_cfg(
        tmp_path, train__max_steps=10, train__learning_rate=1e-3, train__lr_scheduler_type="cosine"
    )
    events, _ = run(cfg, at={5: [Set({"lr_scheduler_type": "constant"})]})
    lr = lrs_of(events)
    assert lr[5] < 1e-3
    for s in range(6, 11):
        assert lr[s] == pytest.approx(lr[5], rel=1e-12)


def test_accumulation_change_recounts_steps_and_keeps_progress(tmp_path):
    # 12 steps x 1 micro-batch planned; after 4 steps, 8 micro-batches remain -> 4 steps of 2.
    cfg = make_cfg(
        tmp_path, train__max_steps=12, train__learning_rate=1e-3, train__lr_scheduler_type="linear"
    )
    events, t = run(cfg, at={4: [Set({"gradient_accumulation_steps": 2})]})
    st = steps(events)
    assert sorted(st) == list(range(1, 9))
    assert [st[s].gradient_accumulation_steps for s in range(1, 9)] == [1] * 4 + [2] * 4
    assert st[8].total_steps == 8 and t.plan.micro_batches_left() == 0 and t.plan.seen == 12 * 4
    auto = [c for c in of(events, "change") if c.source == "auto"]
    assert auto[0].changes == {"total_steps": [12, 8]}
    # Linear decay over 12 virtual steps; after step 4 the stride is 2: positions 4, 6, 8, 10.
    expected = {5: 8 / 12, 6: 6 / 12, 7: 4 / 12, 8: 2 / 12}
    for s, frac in expected.items():
        assert st[s].learning_rate == pytest.approx(1e-3 * frac, rel=1e-12)


def test_optimizer_swap_carries_adam_moments(tmp_path):
    cfg = make_cfg(tmp_path, train__max_steps=6, train__optim="adamw_torch")
    events, t = run(cfg, at={3: [Set({"optim": "adamw_torch_fused"})]})
    assert type(t.optimizer).__name__ == "AdamW" and t.optimizer.defaults.get("fused")
    change = of(events, "change")[0]
    assert change.changes == {"optim": ["adamw_torch", "adamw_torch_fused"]}
    # After 6 steps in total, each state's step counter says 6: the moments were carried, not reset.
    assert {float(s["step"]) for s in t.optimizer.state.values()} == {6.0}


def test_swap_moments_are_identical_right_after_the_swap(tmp_path):
    from tunedeck.engine import optim
    from tunedeck.engine.config import TrainConfig

    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = optim.build("adamw_torch", optim.param_groups([("w", p)], 0.0), TrainConfig(), 1e-3)
    p.grad = torch.randn(4, 4)
    opt.step()
    new, carried = optim.swap(opt, "adamw_torch", "adamw_torch_fused", TrainConfig(), 0.0)
    assert carried
    assert torch.equal(new.state[p]["exp_avg"], opt.state[p]["exp_avg"])
    assert torch.equal(new.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
    _, carried_sgd = optim.swap(opt, "adamw_torch", "sgd", TrainConfig(), 0.0)
    assert not carried_sgd


def test_swap_to_sgd_warns_that_state_starts_fresh_and_the_lr_is_adam_sized(tmp_path):
    events, t = run(make_cfg(tmp_path, train__max_steps=5), at={2: [Set({"optim": "sgd"})]})
    assert isinstance(t.optimizer, torch.optim.SGD)
    (warning,) = of(events, "warning")
    assert warning.message == (
        "adamw_torch -> sgd: optimizer state starts fresh (moments carry over only between fp32 Adam "
        "variants); learning_rate 0.003 is below the usual range for sgd (0.01 to 0.5): training will "
        "barely move"
    )
    assert warning.advice == "set learning_rate between 0.01 and 0.5; find_lr measures it for this model"
    assert of(events, "end")[0].status == "completed"


def test_swap_to_sgd_with_an_sgd_sized_lr_and_back_to_adam(tmp_path):
    events, _ = run(
        make_cfg(tmp_path, train__max_steps=5),
        at={2: [Set({"optim": "sgd", "learning_rate": 0.05})], 3: [Set({"optim": "adamw_torch"})]},
    )
    assert [w.message for w in of(events, "warning")] == [
        "adamw_torch -> sgd: optimizer state starts fresh (moments carry over only between fp32 Adam variants)",
        "sgd -> adamw_torch: optimizer state starts fresh (moments carry over only between fp32 Adam "
        "variants); learning_rate 0.05 is above the usual range for adamw_torch (1e-06 to 0.01): training "
        "may diverge",
    ]


def test_batch_size_changes_live_and_the_data_goes_on_from_the_same_example(tmp_path, monkeypatch):
    """An epoch of 24 examples at batch 4 (6 steps); from step 3 on batch 3: the 16 examples left in
    6 micro-batches (3, 3, 3, 3, 3, 1), so 8 steps in all, and every example once, in order."""
    import json

    from tunedeck.engine.plan import StepPlan

    words = ["cat", "dog", "sun", "sky", "sea", "owl", "elk", "yak", "ant", "bee", "cow", "hen"]
    rows = [
        {"prompt": f"{op}: {w}\n", "completion": w[::-1] if op == "Reverse" else w.upper()}
        for op in ("Upper", "Reverse")
        for w in words
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    taken = []
    real = StepPlan.next_step

    def spy(self):
        out = real(self)
        taken.append(out)
        return out

    monkeypatch.setattr(StepPlan, "next_step", spy)
    cfg = make_cfg(tmp_path, data__path=str(path), data__eval_fraction=0.0, train__max_steps=-1)
    events, t = run(cfg, at={2: [Set({"per_device_train_batch_size": 3})]})
    st = steps(events)
    assert sorted(st) == list(range(1, 9)) and st[8].total_steps == 8
    assert [[s.stop - s.start for s in step] for step in taken] == [[4], [4]] + [[3]] * 5 + [[1]]
    flat = [i for step in taken for s in step for i in range(s.start, s.stop)]
    assert flat == list(range(24)) and {s.epoch for step in taken for s in step} == {0}
    assert [(c.changes, c.source) for c in of(events, "change")] == [
        ({"per_device_train_batch_size": [4, 3]}, "user"),
        ({"total_steps": [6, 8]}, "auto"),
    ]
    assert t.cfg.train.per_device_train_batch_size == 3 and t.plan.seen == 24


def test_keeping_the_effective_batch_keeps_the_steps_and_the_updates(tmp_path):
    """Batch 4 x 1 -> 2 x 2 after step 3 under max_steps: still 8 steps, the same examples per step, and
    (no dropout) the same losses as the unchanged run up to fp32 rounding."""
    kw = dict(train__max_steps=8, lora__dropout=0.0)
    plain, p = run(make_cfg(tmp_path / "a", **kw))
    same = Set({"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2})
    events, t = run(make_cfg(tmp_path / "b", **kw), at={3: [same]})
    a, b = steps(plain), steps(events)
    assert sorted(b) == list(range(1, 9)) and t.plan.seen == p.plan.seen == 32
    assert [b[s].gradient_accumulation_steps for s in b] == [1] * 3 + [2] * 5
    assert max(abs(a[s].loss - b[s].loss) for s in a) < 1e-5
    (change,) = of(events, "change")  # no total_steps change
    assert change.changes == {"per_device_train_batch_size": [4, 2], "gradient_accumulation_steps": [1, 2]}


def test_grad_norm_clip_and_weight_decay_apply_live(tmp_path):
    events, t = run(
        make_cfg(tmp_path, train__max_steps=5), at={2: [Set({"max_grad_norm": 0.01, "weight_decay": 0.05})]}
    )
    assert t.cfg.train.max_grad_norm == 0.01
    decays = {g["weight_decay"] for g in t.optimizer.param_groups if g["decays"]}
    assert decays == {0.05}
    assert of(events, "change")[0].changes == {"max_grad_norm": [1.0, 0.01], "weight_decay": [0.0, 0.05]}


def test_eval_and_save_intervals_change_live(tmp_path):
    cfg = make_cfg(tmp_path, train__max_steps=8, data__eval_fraction=0.05)
    events, t = run(cfg, at={2: [Set({"eval_steps": 3, "save_steps": 4})]})
    assert [e.step for e in of(events, "eval")] == [3, 6, 8]  # and at the end, as HF Trainer
    ckpts = [e.step for e in of(events, "checkpoint")]
    assert (
        ckpts[:1] == [4]
        and (t.run_dir / "checkpoints" / "step-000004" / "adapter_model.safetensors").is_file()
    )


def test_refused_set_changes_nothing(tmp_path):
    events, t = run(
        make_cfg(tmp_path, train__max_steps=4),
        at={
            2: [
                Set({"learning_rate": -1, "weight_decay": 0.1}),
                Set({"seed": 3}),
                Set({"per_device_train_batch_size": 0, "learning_rate": 1e-3}),
            ]
        },
    )
    errors = of(events, "error")
    assert len(errors) == 3
    assert "train.learning_rate=-1.0 is out of range" in errors[0].message
    assert "seed cannot be changed while a run goes" in errors[1].message
    assert errors[2].message == "train.per_device_train_batch_size=0 is out of range"
    assert not of(events, "change")
    assert t.cfg.train.weight_decay == 0.0 and t.cfg.train.learning_rate == 3e-3
    assert of(events, "end")[0].status == "completed"


def test_save_eval_sample_now(tmp_path):
    cfg = make_cfg(tmp_path, train__max_steps=4, data__eval_fraction=0.05)
    events, t = run(cfg, at={2: [Save(), Eval(), Sample(prompt="Upper: cat\n", max_new_tokens=5)]})
    assert [e.step for e in of(events, "checkpoint")][0] == 2
    ev = of(events, "eval")[0]
    assert ev.step == 2 and ev.perplexity == pytest.approx(math.exp(ev.eval_loss))
    sample = of(events, "sample")[0]
    assert sample.step == 2 and sample.prompt == "Upper: cat\n" and isinstance(sample.text, str)


def test_sampling_does_not_change_the_run(tmp_path):
    plain, _ = run(make_cfg(tmp_path / "a", train__max_steps=5, lora__dropout=0.1))
    sampled, _ = run(
        make_cfg(tmp_path / "b", train__max_steps=5, lora__dropout=0.1),
        at={
            2: [Sample(prompt="0+1=", max_new_tokens=4)],
            3: [Sample(prompt="0+1=", max_new_tokens=6, temperature=1.2, top_p=0.9, top_k=20)],
        },
    )
    assert [e.loss for e in of(plain, "step")] == [e.loss for e in of(sampled, "step")]
    assert len(of(sampled, "sample")) == 2


def test_stop_saves_and_ends(tmp_path):
    events, t = run(make_cfg(tmp_path, train__max_steps=20), at={3: [Stop()]})
    end = events[-1]
    assert end.status == "stopped" and end.step == 3
    final = t.run_dir / "final"
    assert (final / "adapter_model.safetensors").is_file() and (final / "adapter_config.json").is_file()
    assert (t.run_dir / "checkpoints" / "step-000003" / "optimizer.pt").is_file()
    assert end.output == str(final)


def test_cancel_ends_without_saving(tmp_path):
    events, t = run(make_cfg(tmp_path, train__max_steps=20), at={3: [Cancel()]})
    assert events[-1].status == "cancelled" and events[-1].step == 3 and events[-1].output is None
    assert not (t.run_dir / "final").exists()


def test_pause_and_resume_state_errors(tmp_path):
    events, _ = run(
        make_cfg(tmp_path, train__max_steps=4), at={1: [Resume()], 2: [Pause(), Pause(), Resume()]}
    )
    states = [e.state for e in of(events, "state")]
    assert states == ["loading", "running", "paused", "running", "stopping", "finished"]
    msgs = [e.message for e in of(events, "error")]
    assert msgs == ["resume: the run is not paused", "pause: the run is already paused"]


def test_schedule_lr_matches_unit_model(tmp_path):
    """The trainer's LRs equal an LRSchedule driven by hand through the same changes."""
    cfg = make_cfg(
        tmp_path,
        train__max_steps=10,
        train__learning_rate=1e-3,
        train__lr_scheduler_type="cosine",
        train__warmup_steps=2,
    )
    events, _ = run(cfg, at={3: [Set({"learning_rate": 5e-4})], 6: [Set({"lr_scheduler_type": "linear"})]})
    s = LRSchedule("cosine", 1e-3, 10, 2)
    expected = {}
    for step in range(1, 11):
        if step == 4:
            s.set_base_lr(5e-4)
        if step == 7:
            s.switch("linear")
        expected[step] = s.lr()
        s.advance()
    assert lrs_of(events) == pytest.approx(expected, rel=1e-12)


def test_a_sample_prompt_is_laid_out_as_the_training_data(tmp_path):
    import json

    from tunedeck.engine import data

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Upper: {w}"},
                {"role": "assistant", "content": w.upper()},
            ]
        }
        for w in ("cat", "dog", "sun", "sky", "sea", "owl", "elk", "yak")
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    events, t = run(make_cfg(tmp_path, train__max_steps=2, data__path=str(path), data__eval_fraction=0.0))
    assert of(events, "start")[0].data["format"] == "messages"
    seen = []
    generate = t.model.generate

    def spy(**kw):
        seen.append(kw["input_ids"][0].tolist())
        return generate(**kw)

    t.model.generate = spy
    text = t.sample("Upper: cow", SamplingOptions(max_new_tokens=3))
    assert seen == [data.prompt_ids(t.tokenizer, "messages", "Upper: cow")]
    assert t.tokenizer.decode(seen[0]) == "<|user|>\nUpper: cow\n<|assistant|>\n"
    assert of(events, "sample")[-1].text == text and of(events, "sample")[-1].prompt == "Upper: cow"


def test_an_empty_sample_prompt_is_refused_and_the_run_goes_on(tmp_path):
    events, _ = run(make_cfg(tmp_path, train__max_steps=3), at={1: [Sample(prompt="", max_new_tokens=3)]})
    errors = of(events, "error")
    assert [e.message for e in errors] == ["the sample prompt is empty"]
    assert not of(events, "sample") and events[-1].status == "completed" and events[-1].step == 3
