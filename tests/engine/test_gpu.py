"""What only a CUDA machine can check: bf16 runs, QLoRA, bitsandbytes optimizers, Liger, the varlen
flash kernel, fused AdamW, NVML. Run with ``pytest -m gpu tests/engine/test_gpu.py`` (bench/gpu_check.sh)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from tests.engine.helpers import make_cfg, of, run, steps
from tunedeck.engine import attention, builtin, optim, packing, precision
from tunedeck.engine.protocol import Set, StepEvent, SystemEvent
from tunedeck.engine.session import TrainingSession

pytestmark = pytest.mark.gpu

BF16_REL = 2e-2  # a few bf16 ulps of a loss near 5, summed over a forward pass


def _close(a: float, b: float, rel: float = BF16_REL) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1.0)


def _finite(events) -> list[float]:
    losses = [e.loss for e in of(events, "step")]
    assert losses and all(math.isfinite(x) for x in losses), losses
    return losses


def _completed(events) -> None:
    end = of(events, "end")[0]
    assert end.status == "completed", [e.message for e in of(events, "error")]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A small Llama with head size 64 (like Llama-3.2-1B), random init, the builtin tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama-small")
    tok = builtin.build_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=256**-0.5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- plain bf16 training


@pytest.mark.parametrize("which", ["tiny", "llama"])
def test_bf16_run_learns(tmp_path, llama_dir, which):
    name = "builtin:tiny" if which == "tiny" else str(llama_dir)
    events, _ = run(
        make_cfg(tmp_path, model__name_or_path=name, train__max_steps=30, train__learning_rate=3e-3)
    )
    _completed(events)
    start = of(events, "start")[0]
    assert start.model["dtype"] == "bfloat16" and start.model["device"].startswith("cuda")
    assert start.model["optimizer"] == "adamw_torch_fused"
    losses = _finite(events)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    s = steps(events)[30]
    assert s.mem_allocated_mb > 0 and s.mem_peak_mb >= s.mem_allocated_mb


# ---------------------------------------------------------------- QLoRA and bitsandbytes optimizers


def test_qlora_nf4_run_learns(tmp_path):
    pytest.importorskip("bitsandbytes")
    events, trainer = run(
        make_cfg(tmp_path, model__load_in_4bit=True, train__max_steps=25, train__learning_rate=3e-3)
    )
    _completed(events)
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    losses = _finite(events)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_bitsandbytes_optimizers_run(tmp_path, name):
    pytest.importorskip("bitsandbytes")
    events, trainer = run(make_cfg(tmp_path, train__optim=name, train__max_steps=4))
    _completed(events)
    _finite(events)
    assert type(trainer.optimizer).__module__.startswith("bitsandbytes")


def test_swap_to_paged_adamw_32bit_carries_the_moments(tmp_path):
    pytest.importorskip("bitsandbytes")
    events, trainer = run(
        make_cfg(tmp_path, train__max_steps=6), at={2: [Set({"optim": "paged_adamw_32bit"})]}
    )
    _completed(events)
    _finite(events)
    assert not [w for w in of(events, "warning") if "starts fresh" in w.message]
    assert of(events, "change")[0].changes == {"optim": ["adamw_torch", "paged_adamw_32bit"]}
    p = trainer.trainable[0]
    state = trainer.optimizer.state[p]
    assert "state1" in state and int(state["step"]) >= 5  # 2 carried over + 4 of its own; fresh would be 4


# ---------------------------------------------------------------- fast paths keep the numbers


def test_fused_adamw_equals_foreach(tmp_path, monkeypatch):
    """fp32 weights so the comparison is tight: fused and foreach AdamW are the same algorithm."""
    kw = dict(model__dtype="float32", train__max_steps=5)
    fused, t1 = run(make_cfg(tmp_path / "a", **kw))
    monkeypatch.setattr(optim, "actual_name", lambda name, device: name)
    plain, t2 = run(make_cfg(tmp_path / "b", **kw))
    assert t1.optimizer.defaults.get("fused") is True and not t2.optimizer.defaults.get("fused")
    a, b = steps(fused), steps(plain)
    assert max(abs(a[s].loss - b[s].loss) for s in a) < 1e-4


def test_liger_equals_plain_within_bf16(tmp_path, llama_dir):
    pytest.importorskip("liger_kernel")
    kw = dict(model__name_or_path=str(llama_dir), train__max_steps=3)
    liger, _ = run(make_cfg(tmp_path / "a", train__use_liger_kernel=True, **kw))
    plain, _ = run(make_cfg(tmp_path / "b", train__use_liger_kernel=False, **kw))
    _completed(liger)
    assert of(liger, "start")[0].model["liger"] is True and of(plain, "start")[0].model["liger"] is False
    assert of(liger, "start")[0].model["liger_rope"] is True
    a, b = steps(liger), steps(plain)
    assert all(_close(a[s].loss, b[s].loss) for s in a), ([a[s].loss for s in a], [b[s].loss for s in b])


def test_liger_rope_kernel_equals_transformers_rope(llama_dir):
    """The switch hands the attention's RoPE to Liger's kernel: same rotation within bf16, forward and backward."""
    pytest.importorskip("liger_kernel")
    import sys

    from transformers import AutoModelForCausalLM

    from tunedeck.engine import liger

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).cuda()
    module = sys.modules[type(model).__module__]
    before = dict(vars(module))
    assert liger.apply(model, torch.device("cuda")) == liger.Applied(kernels=True, rope=True)
    # Of the modeling module's names only RoPE changed, to the switch (checked with liger-kernel 0.8.5
    # on the CPU machine too, where its Python patching runs though its kernels cannot).
    assert [k for k in before if vars(module).get(k) is not before[k]] in ([], ["apply_rotary_pos_emb"])
    switch = module.apply_rotary_pos_emb
    assert isinstance(switch, liger.RopeSwitch) and switch.fused.__name__ == "liger_rotary_pos_emb"
    torch.manual_seed(0)
    q = torch.randn(2, 4, 96, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 2, 96, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(96, device="cuda")[None].expand(2, -1)
    cos, sin = model.model.rotary_emb(q, pos)
    outs = {}
    for on in (False, True):
        with liger.fused_rope(on):
            qo, ko = switch(q, k, cos, sin)
        (qo.float().square().sum() + ko.float().sum()).backward()
        outs[on] = (qo.detach(), ko.detach(), q.grad.clone(), k.grad.clone())
        q.grad = k.grad = None
    for a, b in zip(outs[False], outs[True]):
        assert torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("liger", [False, True])
def test_varlen_packed_equals_padded_within_bf16(tmp_path, llama_dir, liger):
    if liger:
        pytest.importorskip("liger_kernel")
    if attention.varlen_kernel() is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    kw = dict(model__name_or_path=str(llama_dir), train__max_steps=4, train__use_liger_kernel=liger)
    packed, _ = run(make_cfg(tmp_path / "a", data__packing=True, **kw))
    padded, _ = run(make_cfg(tmp_path / "b", data__packing=False, **kw))
    _completed(packed)
    assert of(packed, "start")[0].model["attention"] == f"{attention.VARLEN} (varlen_attn)"
    a, b = steps(packed), steps(padded)
    assert _close(a[1].loss, b[1].loss), (a[1].loss, b[1].loss)
    assert a[1].tokens < b[1].tokens  # packed counts real tokens only, padded counts the mask


def test_varlen_kernel_forward_and_backward_match_per_sequence_sdpa():
    if attention.varlen_kernel() is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")

    class Attn(torch.nn.Module):
        is_causal = True
        num_key_value_groups = 4

    lengths = [300, 17, 1024, 64, 1]
    t = sum(lengths)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(1, h, t, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        for h in (8, 2, 2)
    )
    pos = torch.tensor([[i for n in lengths for i in range(n)]])
    kwargs = {
        key: (val.cuda() if isinstance(val, torch.Tensor) else val)
        for key, val in packing.packed_kwargs(pos).items()
    }
    out, _ = attention.varlen_attention_forward(Attn(), q, k, v, None, scaling=0.125, **kwargs)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    ref = attention._per_sequence(q.float(), k.float(), v.float(), cu, 0.0, 0.125)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert (out.float() - ref).abs().max() < 2e-2
    for a, b in zip(grads, ref_grads, strict=True):
        assert (a.float() - b.float()).abs().max() <= 5e-2 * b.float().abs().max()


def test_autocast_equals_no_autocast_within_bf16(tmp_path, monkeypatch):
    on, _ = run(make_cfg(tmp_path / "a", train__max_steps=3))
    monkeypatch.setattr(precision, "autocast", lambda *a: __import__("contextlib").nullcontext())
    off, _ = run(make_cfg(tmp_path / "b", train__max_steps=3))
    a, b = steps(on), steps(off)
    assert all(_close(a[s].loss, b[s].loss) for s in a)


def test_one_sync_per_step_without_liger(tmp_path, llama_dir):
    """Rule 5: the loop syncs to read the loss once per optimizer step. Counted with CUDA's sync
    debug mode over steps 3..6 (packing through the varlen kernel, fused AdamW, no Liger: its fused
    cross-entropy reads a count itself)."""
    counts: dict[int, int] = {}
    cfg = make_cfg(
        tmp_path,
        model__name_or_path=str(llama_dir),
        train__max_steps=6,
        data__packing=True,
        train__use_liger_kernel=False,
    )
    caught: list = []

    def emit_hook(e):
        if isinstance(e, StepEvent):
            counts[e.step] = len(caught)
            torch.cuda.set_sync_debug_mode("warn" if 2 <= e.step < 6 else 0)

    import queue

    from tunedeck.engine.trainer import Trainer

    events: list = []
    trainer = Trainer(cfg, lambda e: (events.append(e), emit_hook(e)), queue.Queue())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        caught = w
        try:
            trainer.run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    per_step = [counts[s + 1] - counts[s] for s in range(2, 6)]
    assert max(per_step) <= 1, per_step


# ---------------------------------------------------------------- monitoring


def test_nvml_readings_in_system_events(tmp_path):
    s = TrainingSession(make_cfg(tmp_path, train__max_steps=40), system_interval=0.1)
    s.start()
    assert s.join(300)
    systems = [e for e in s.drain() if isinstance(e, SystemEvent)]
    assert systems
    e = systems[-1]
    assert e.gpu_mem_total_mb and e.gpu_mem_total_mb > 1000
    assert e.gpu_mem_used_mb and e.gpu_mem_used_mb > 0
    assert e.gpu_util is not None and e.gpu_temp_c is not None
    assert e.gpu_power_w is not None and 10 < e.gpu_power_w < 2000  # watts, not milliwatts


# Last: compiling takes the longest, and bench/gpu_check.sh caps the whole file's time.
def test_torch_compile_inductor_equals_eager_within_bf16(tmp_path, llama_dir):
    kw = dict(model__name_or_path=str(llama_dir), train__max_steps=4, data__packing=True)
    comp, _ = run(make_cfg(tmp_path / "a", train__torch_compile=True, **kw))
    plain, _ = run(make_cfg(tmp_path / "b", **kw))
    _completed(comp)
    assert of(comp, "start")[0].model["compiled"] == "inductor"
    a, b = steps(comp), steps(plain)
    assert all(_close(a[s].loss, b[s].loss) for s in a), ([a[s].loss for s in a], [b[s].loss for s in b])
