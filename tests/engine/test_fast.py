"""The fast paths on the CPU (attention, packing, precision): padding-free packing and its fallbacks, the kernel plumbing (with a stand-in
kernel), batch preparation, the monitoring-off switch, Liger's clean-up, and the CPU benchmark."""

from __future__ import annotations

import json
import sys
import types
import warnings

import pytest
import torch

from tests.engine.helpers import make_cfg, of, run, steps
from tunedeck.engine import attention, builtin, optim, packing, precision
from tunedeck.engine.data import IGNORE_INDEX, collate
from tunedeck.engine.protocol import StepEvent, SystemEvent
from tunedeck.engine.session import TrainingSession

# ---------------------------------------------------------------- cumulative lengths


@pytest.mark.parametrize(
    "pos, cu, longest",
    [
        ([[0, 1, 2, 0, 1, 0, 1, 2, 3]], [0, 3, 5, 9], 4),
        ([[0, 1, 2, 3], [0, 1, 0, 1]], [0, 4, 6, 8], 4),  # rows read end to end
        ([[5, 6, 0, 1]], [0, 2, 4], 2),  # a row always starts a sequence
        ([[0, 1, 2, 3, 4]], [0, 5], 5),
    ],
)
def test_cu_seqlens_from_position_ids(pos, cu, longest):
    got, m = packing.cu_seqlens(torch.tensor(pos))
    assert got.dtype == torch.int32
    assert got.tolist() == cu and m == longest


def test_cu_seqlens_of_a_packed_collate():
    examples = [{"input_ids": list(range(3, 3 + n)), "labels": list(range(3, 3 + n))} for n in (5, 2, 7)]
    batch = packing.prepare_batch(collate(examples, 2, packing=True), varlen=True)
    assert batch[packing.CU_Q].tolist() == [0, 5, 7, 14] and batch[packing.MAX_Q] == 7
    assert batch[packing.CU_K] is batch[packing.CU_Q] and batch[packing.MAX_K] == 7


def test_prepare_batch_drops_only_an_all_ones_mask():
    even = [{"input_ids": [3, 4, 5], "labels": [3, 4, 5]}] * 2
    uneven = [{"input_ids": [3, 4, 5], "labels": [3, 4, 5]}, {"input_ids": [3], "labels": [3]}]
    assert "attention_mask" not in packing.prepare_batch(collate(even, 2), varlen=False)
    kept = packing.prepare_batch(collate(uneven, 2), varlen=False)
    assert kept["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert packing.CU_Q not in packing.prepare_batch(collate(uneven, 2, packing=True), varlen=False)


# ---------------------------------------------------------------- the attention function


def _padded_reference(q, k, v, lengths, scale=None):
    """Attention of each sequence on its own (SDPA, causal, kv heads repeated): [1, T, H, D]."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    outs, s = [], 0
    for n in lengths:
        outs.append(
            torch.nn.functional.scaled_dot_product_attention(
                q[:, :, s : s + n], k[:, :, s : s + n], v[:, :, s : s + n], is_causal=True, scale=scale
            )
        )
        s += n
    return torch.cat(outs, dim=2).transpose(1, 2)


def _qkv(lengths, hq=4, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    return (
        torch.randn(1, hq, t, d, generator=g),
        torch.randn(1, hkv, t, d, generator=g),
        torch.randn(1, hkv, t, d, generator=g),
    )


class _Attn(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2  # what transformers' SDPA path reads to repeat the kv heads


def test_per_sequence_path_equals_attention_of_each_example():
    lengths = [5, 1, 9, 3]
    q, k, v = _qkv(lengths)
    pos = torch.tensor([[i for n in lengths for i in range(n)]])
    want = _padded_reference(q, k, v, lengths, scale=0.3)
    via_cu, _ = attention.varlen_attention_forward(
        _Attn(), q, k, v, None, scaling=0.3, position_ids=pos, **packing.packed_kwargs(pos)
    )
    via_pos, _ = attention.varlen_attention_forward(_Attn(), q, k, v, None, scaling=0.3, position_ids=pos)
    assert via_cu.shape == (1, sum(lengths), 4, 16)
    assert torch.allclose(via_cu, want, atol=1e-6) and torch.allclose(via_pos, want, atol=1e-6)


def test_plain_inputs_go_to_sdpa_unchanged():
    q, k, v = _qkv([8])
    pos = torch.arange(8)[None]
    out, _ = attention.varlen_attention_forward(_Attn(), q, k, v, None, position_ids=pos)
    assert torch.allclose(out, _padded_reference(q, k, v, [8]), atol=1e-6)
    # Generation with a cache: one new query against all cached keys, no mask, not causal.
    one, _ = attention.varlen_attention_forward(_Attn(), q[:, :, -1:], k, v, None, position_ids=pos[:, -1:])
    assert torch.allclose(one[0, 0], out[0, -1], atol=1e-6)


def test_kernel_features_follow_the_signature():
    def old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False):
        pass

    def new(
        query,
        key,
        value,
        cu_seq_q,
        cu_seq_k,
        max_q,
        max_k,
        *,
        scale=None,
        window_size=(-1, -1),
        enable_gqa=False,
    ):
        pass

    def neither(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k):
        pass

    assert attention.kernel_features(old) == {
        "window_size": False,
        "is_causal": True,
        "scale": False,
        "enable_gqa": False,
    }
    assert attention.kernel_features(new) == {
        "window_size": True,
        "is_causal": False,
        "scale": True,
        "enable_gqa": True,
    }
    assert attention.kernel_features(neither) is None


@pytest.mark.parametrize("style", ["is_causal", "window_size"])
def test_kernel_call_plumbing_with_a_stand_in_kernel(monkeypatch, style):
    """The shapes, GQA, causal flag and cumulative lengths handed to varlen_attn, checked on the CPU
    against a stand-in that computes what the real kernel documents."""
    calls = []

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        calls.append(kw)
        assert q.shape[0] == k.shape[0] == int(cu_q[-1]) and cu_q is cu_k and max_q == max_k == 9
        causal = kw.get("is_causal", False) or kw.get("window_size") == (-1, 0)
        assert causal
        if not kw.get("enable_gqa"):
            assert k.shape[1] == q.shape[1]
        ref = _padded_reference(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            torch.diff(cu_q).tolist(),
            scale=kw.get("scale"),
        )
        return ref[0]

    if style == "is_causal":

        def sig(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False):
            pass
    else:

        def sig(
            query,
            key,
            value,
            cu_seq_q,
            cu_seq_k,
            max_q,
            max_k,
            *,
            scale=None,
            window_size=(-1, -1),
            enable_gqa=False,
        ):
            pass

    monkeypatch.setattr(attention, "varlen_kernel", lambda: (kernel, attention.kernel_features(sig)))
    monkeypatch.setattr(attention, "_kernel_ok", lambda *a: True)
    lengths = [4, 9, 2]
    q, k, v = _qkv(lengths)
    pos = torch.tensor([[i for n in lengths for i in range(n)]])
    out, _ = attention.varlen_attention_forward(
        _Attn(), q, k, v, None, scaling=16**-0.5, **packing.packed_kwargs(pos)
    )
    assert torch.allclose(out, _padded_reference(q, k, v, lengths), atol=1e-6)
    want = {
        "is_causal": {"is_causal": True},
        "window_size": {"window_size": (-1, 0), "scale": 0.25, "enable_gqa": True},
    }[style]
    assert calls == [want]


def test_kernel_needs_cuda_and_half_precision():
    f = {"window_size": True, "is_causal": False, "scale": True, "enable_gqa": True}
    assert not attention._kernel_ok(torch.zeros(1, 2, 3, 64), 0.0, None, f)
    assert not attention.varlen_available(torch.device("cpu"), torch.bfloat16)
    assert optim.actual_name("adamw_torch", torch.device("cpu")) == "adamw_torch"
    assert optim.actual_name("adamw_torch", torch.device("cuda")) == "adamw_torch_fused"
    assert optim.actual_name("sgd", torch.device("cuda")) == "sgd"
    with precision.autocast(torch.device("cpu"), torch.float32):
        assert not torch.is_autocast_enabled("cpu")


def test_autocast_lets_lora_skip_its_fp32_input_cast_only_inside(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(builtin.tiny_model_dir()),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    layers = precision._peft_layers(model)
    assert len(layers) == 8
    with precision.autocast(torch.device("cpu"), torch.float32, model):
        assert all(getattr(m, "cast_input_dtype_enabled", True) for m in layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available": autocast itself turns off here
        with precision.autocast(torch.device("cuda"), torch.bfloat16, model):
            assert not any(m.cast_input_dtype_enabled for m in layers)
    assert all(m.cast_input_dtype_enabled for m in layers)


# ---------------------------------------------------------------- packing equals padding


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(
        builtin.tiny_model_dir(), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


def _per_example_losses(logits, labels, cu):
    ce = torch.nn.functional.cross_entropy(
        logits[0, :-1].float(), labels[0, 1:], reduction="none", ignore_index=IGNORE_INDEX
    )
    ce = torch.cat([ce, ce.new_zeros(1)])
    counts = (labels[0, 1:] != IGNORE_INDEX).tolist() + [False]
    out = []
    for s, e in zip(cu[:-1], cu[1:], strict=True):
        out.append(float(ce[s:e].sum() / max(1, sum(counts[s:e]))))
    return out


@pytest.mark.parametrize("impl", ["sdpa", attention.VARLEN])
def test_packing_gives_the_same_per_example_loss(tiny, impl):
    """Each example's loss in a packed row (block mask with SDPA, or padding-free) equals its loss alone."""
    g = torch.Generator().manual_seed(1)
    examples = []
    for n in (17, 3, 40, 9):
        ids = torch.randint(3, 259, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 3) + ids[n // 3 :]})
    alone = []
    with torch.no_grad():
        for ex in examples:
            b = collate([ex], 2)
            out = tiny(input_ids=b["input_ids"], labels=b["labels"], use_cache=False)
            alone.append(float(out.loss))
        attention.register()
        tiny.set_attn_implementation(impl)
        try:
            packed = packing.prepare_batch(
                collate(examples, 2, packing=True), varlen=impl == attention.VARLEN
            )
            logits = tiny(**{k: v for k, v in packed.items() if k != "labels"}, use_cache=False).logits
        finally:
            tiny.set_attn_implementation("sdpa")
    cu = packing.cu_seqlens(packed["position_ids"])[0].tolist()
    got = _per_example_losses(logits, packed["labels"], cu)
    assert max(abs(a - b) for a, b in zip(alone, got, strict=True)) < 1e-5, (alone, got)


def test_packed_runs_fall_back_on_the_cpu_and_equal_the_unpacked_run(tmp_path, monkeypatch):
    base, _ = run(make_cfg(tmp_path / "a", train__max_steps=3))
    per_seq, _ = run(make_cfg(tmp_path / "b", train__max_steps=3, data__packing=True))
    # The brief's CPU fallback: packed rows through SDPA with transformers' block-diagonal mask.
    monkeypatch.setattr(attention, "enable_varlen", lambda *a, **k: None)
    block, _ = run(make_cfg(tmp_path / "c", train__max_steps=3, data__packing=True))
    for events in (base, per_seq, block):
        assert of(events, "end")[0].status == "completed"
    assert of(per_seq, "start")[0].model["attention"] == f"{attention.VARLEN} (sdpa_per_sequence)"
    assert of(block, "start")[0].model["attention"] == "sdpa"
    a, b, c = steps(base), steps(per_seq), steps(block)
    assert abs(a[1].loss - b[1].loss) < 1e-5 and abs(a[1].loss - c[1].loss) < 1e-5
    assert max(abs(a[s].loss - b[s].loss) for s in a) < 1e-4
    assert b[1].tokens == c[1].tokens <= a[1].tokens  # real tokens only when packed


# ---------------------------------------------------------------- monitoring off


def test_monitoring_off_has_no_sampler_and_sparse_step_events(tmp_path):
    cfg = make_cfg(tmp_path, train__max_steps=6, train__logging_steps=3)
    s = TrainingSession(cfg, system_interval=0)
    s.start()
    assert s.join(120)
    events = s.drain()
    assert not [e for e in events if isinstance(e, SystemEvent)]
    assert [e.step for e in events if isinstance(e, StepEvent)] == [3, 6]
    assert events[-1].status == "completed"


# ---------------------------------------------------------------- Liger leaves other models alone


def test_liger_patches_only_the_instance_and_switches_rope(monkeypatch, tiny):
    """Liger's per-model functions swap module-level names too (norm and MLP classes, RoPE); those are
    put back so no other model in the process changes, and RoPE becomes a switch that uses Liger's
    kernel only inside liger.fused_rope()."""
    from tunedeck.engine import liger

    mod = sys.modules[type(tiny).__module__]
    before = {k: getattr(mod, k) for k in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")}
    plain_rope = before["apply_rotary_pos_emb"]
    seen, fused_calls = {}, []

    def fused_rope(q, k, cos, sin):  # a stand-in kernel: counts its calls, computes the same rotation
        fused_calls.append(q.shape)
        return plain_rope(q, k, cos, sin)

    def apply(model, **kw):
        seen.update(kw)
        mod.apply_rotary_pos_emb = fused_rope
        mod.LlamaRMSNorm = object
        mod.LlamaMLP = object
        model.forward = types.MethodType(lambda self, **k: None, model)

    fake = types.ModuleType("liger_kernel.transformers")
    fake._apply_liger_kernel_to_instance = apply
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(builtin.tiny_model_dir())
    try:
        assert liger.apply(other, torch.device("cuda")) == liger.Applied(kernels=True, rope=True)
        assert seen == {"rope": True, "cross_entropy": False, "fused_linear_cross_entropy": True}
        switch = mod.apply_rotary_pos_emb
        assert (
            isinstance(switch, liger.RopeSwitch) and switch.plain is plain_rope and switch.fused is fused_rope
        )
        assert (mod.LlamaRMSNorm, mod.LlamaMLP) == (before["LlamaRMSNorm"], before["LlamaMLP"])
        assert "forward" in vars(other) and "forward" not in vars(tiny)
        # Another model (here the untouched tiny one) keeps transformers' RoPE outside the switch...
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        with torch.no_grad():
            ref = tiny(input_ids=ids).logits
            assert fused_calls == []
            # ...and inside it gets the kernel in all 4 layers, with the same numbers.
            with liger.fused_rope(True):
                out = tiny(input_ids=ids).logits
            assert len(fused_calls) == tiny.config.num_hidden_layers
            assert torch.equal(out, ref)
            with liger.fused_rope(False):
                tiny(input_ids=ids)
            assert len(fused_calls) == tiny.config.num_hidden_layers and liger.RopeSwitch.fused_on is False
        # A second Liger model of the same type keeps the one switch.
        again = AutoModelForCausalLM.from_pretrained(builtin.tiny_model_dir())
        assert liger.apply(again, torch.device("cuda")) == liger.Applied(kernels=True, rope=True)
        assert mod.apply_rotary_pos_emb is switch and switch.plain is plain_rope
    finally:
        for k, v in before.items():
            setattr(mod, k, v)
    assert liger.apply(other, torch.device("cpu")) == liger.Applied()


def test_liger_is_left_out_for_a_model_type_it_does_not_know(monkeypatch, tiny):
    from tunedeck.engine import liger

    def apply(model, **kw):
        raise ValueError("no Liger kernels for this model type")

    fake = types.ModuleType("liger_kernel.transformers")
    fake._apply_liger_kernel_to_instance = apply
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    mod = sys.modules[type(tiny).__module__]
    rope = mod.apply_rotary_pos_emb
    assert liger.apply(tiny, torch.device("cuda")) == liger.Applied()
    assert mod.apply_rotary_pos_emb is rope and "forward" not in vars(tiny)


# ---------------------------------------------------------------- the benchmark, CPU mode


def test_bench_cpu_mode_end_to_end(tmp_path, capsys):
    from bench import vs_trainer

    out = tmp_path / "r.json"
    assert (
        vs_trainer.main(
            [
                "--mode",
                "cpu",
                "--job",
                "all",
                "--steps",
                "2",
                "--warmup",
                "2",
                "--repeats",
                "1",
                "--seq-len",
                "48",
                "--min-len",
                "8",
                "--monitoring",
                "--variant",
                "padded:data.packing=false",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    for job in ("fixed", "variable"):
        s = result["summary"][job]
        assert set(s["sides"]) == {"trainer", "engine", "engine-monitoring-off", "engine-padded"}
        assert s["first_loss_diff"] < 1e-5  # same data order, same init: the same first loss
        assert s["speed_ratio"] > 0 and "monitoring_cost" in s
        padded = s["sides"]["engine-padded"]
        assert abs(padded["first_loss"] - s["sides"]["trainer"]["first_loss"]) < 1e-5
        assert (
            s["variant_speed_ratio"]["engine-padded"]
            == padded["tokens_per_s"] / s["sides"]["trainer"]["tokens_per_s"]
        )
    runs = {(r["job"], r["side"]): r for r in result["runs"]}
    assert (
        runs[("variable", "engine")]["info"]["attention"]
        != runs[("variable", "engine-padded")]["info"]["attention"]
    )
    printed = capsys.readouterr().out
    assert "tokens/s engine/trainer" in printed and "tokens/s engine-padded/trainer" in printed


def test_torch_compile_matches_eager_and_keeps_checkpoints_plain(tmp_path):
    # The eager backend runs what dynamo captured without generating kernels: it checks what compiling
    # changes for the engine (parameter names, generate, eval mode, resume) in seconds, not minutes.
    # Inductor itself is timed in the GPU benchmark (bench/gpu_check.sh).
    from tunedeck.engine.protocol import Eval, Sample

    kw = dict(train__max_steps=4, train__save_steps=2, train__eval_steps=0)
    at = {2: [Eval(), Sample(prompt="Upper: cat\n", max_new_tokens=4)]}
    plain, p = run(make_cfg(tmp_path / "plain", **kw), at=at)
    comp, c = run(
        make_cfg(tmp_path / "comp", train__torch_compile=True, train__torch_compile_backend="eager", **kw),
        at=at,
    )
    assert of(comp, "start")[0].model["compiled"] == "eager"
    assert of(plain, "start")[0].model["compiled"] is None
    a, b = steps(plain), steps(comp)
    assert sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert b[s].loss == pytest.approx(a[s].loss, rel=1e-5), s
    assert of(comp, "eval")[0].eval_loss == pytest.approx(of(plain, "eval")[0].eval_loss, rel=1e-5)
    assert of(comp, "sample")[0].text == of(plain, "sample")[0].text
    from safetensors.torch import load_file

    ckpt = c.run_dir / "checkpoints" / "step-000002"
    keys_c = set(load_file(ckpt / "adapter_model.safetensors"))
    keys_p = set(load_file(p.run_dir / "checkpoints" / "step-000002" / "adapter_model.safetensors"))
    assert keys_c == keys_p and not [k for k in keys_c if "_orig_mod" in k]
    # Resuming the compiled run's checkpoint (compiled again, from its saved config) continues it.
    resumed, _ = run(None, resume_from=ckpt)
    r = steps(resumed)
    assert sorted(r) == [3, 4]
    assert r[4].loss == pytest.approx(b[4].loss, rel=1e-5)
