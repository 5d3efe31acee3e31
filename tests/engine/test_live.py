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


def test_swap_to_sgd_warns_that_state_starts_fresh(tmp_path):
    events, t = run(make_cfg(tmp_path, train__max_steps=5), at={2: [Set({"optim": "sgd"})]})
    assert isinstance(t.optimizer, torch.optim.SGD)
    assert any("starts fresh" in w.message for w in of(events, "warning"))
    assert of(events, "end")[0].status == "completed"


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
    assert [e.step for e in of(events, "eval")] == [3, 6]
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
                Set({"per_device_train_batch_size": 2}),
                Set({"optim": "adamw_8bit"}),
            ]
        },
    )
    errors = of(events, "error")
    assert len(errors) == 3
    assert "train.learning_rate=-1.0 is out of range" in errors[0].message
    assert "per_device_train_batch_size cannot be changed while a run goes" in errors[1].message
    assert "adamw_8bit needs a CUDA GPU" in errors[2].message
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
