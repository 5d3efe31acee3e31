"""Print the equality figures of the engine's fast paths that a CPU can measure (fp32, builtin:tiny).

    python -m bench.fast_equality

- padding-free packing (SDPA once per example) and the block-diagonal-mask fallback against
  unpacked batches: the losses of a 6-step run on the demo;
- each example's loss inside a packed row against its loss alone;
- the varlen attention function (per-sequence path) against SDPA on each sequence alone;
- ``train.torch_compile`` (inductor, and the eager backend) against the plain run.
The GPU-only paths (the varlen flash kernel, Liger, fused AdamW, bf16 autocast) are checked by
tests/engine/test_gpu.py within bf16 tolerance.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from tests.engine.helpers import make_cfg, run, steps
from tunedeck.engine import attention, builtin, packing
from tunedeck.engine.data import IGNORE_INDEX, collate


def runs(tmp: Path) -> None:
    import unittest.mock

    base, _ = run(make_cfg(tmp / "a", train__max_steps=6))
    packed, _ = run(make_cfg(tmp / "b", train__max_steps=6, data__packing=True))
    with unittest.mock.patch.object(attention, "enable_varlen", lambda *a, **k: None):
        block, _ = run(make_cfg(tmp / "c", train__max_steps=6, data__packing=True))
    a, b, c = steps(base), steps(packed), steps(block)
    print("packing, 6 steps on the demo, batch 4, fp32 CPU (losses: unpacked / padding-free / block mask)")
    for s in a:
        print(
            f"  step {s}: {a[s].loss:.7f} / {b[s].loss:.7f} / {c[s].loss:.7f}   tokens {a[s].tokens} / "
            f"{b[s].tokens} / {c[s].tokens}"
        )
    print(
        f"  step-1 |diff| padding-free {abs(a[1].loss - b[1].loss):.1e}, block mask {abs(a[1].loss - c[1].loss):.1e};"
        f" max over 6 steps {max(abs(a[s].loss - b[s].loss) for s in a):.1e} / "
        f"{max(abs(a[s].loss - c[s].loss) for s in a):.1e}"
    )


def per_example() -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(builtin.tiny_model_dir(), dtype=torch.float32).eval()
    attention.register()
    g = torch.Generator().manual_seed(1)
    examples = []
    for n in (17, 3, 40, 9, 128, 64):
        ids = torch.randint(3, 259, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 3) + ids[n // 3 :]})
    with torch.no_grad():
        alone = []
        for ex in examples:
            b = collate([ex], 2)
            alone.append(float(model(input_ids=b["input_ids"], labels=b["labels"], use_cache=False).loss))
        worst = {}
        for impl in ("sdpa", attention.VARLEN):
            model.set_attn_implementation(impl)
            packed = packing.prepare_batch(
                collate(examples, 2, packing=True), varlen=impl == attention.VARLEN
            )
            logits = model(**{k: v for k, v in packed.items() if k != "labels"}, use_cache=False).logits
            labels = packed["labels"][0]
            ce = torch.nn.functional.cross_entropy(
                logits[0, :-1], labels[1:], reduction="none", ignore_index=IGNORE_INDEX
            )
            cu = packing.cu_seqlens(packed["position_ids"])[0].tolist()
            got = []
            for s, e in zip(cu[:-1], cu[1:], strict=True):
                seg = slice(s, e - 1)  # the prediction of e-1's successor belongs to the next example
                got.append(float(ce[seg].sum() / (labels[s + 1 : e] != IGNORE_INDEX).sum()))
            worst[impl] = max(abs(x - y) for x, y in zip(alone, got, strict=True))
    print(
        f"per-example loss in a packed row vs alone ({len(examples)} examples, 3..128 tokens): max |diff| "
        f"block mask {worst['sdpa']:.1e}, padding-free {worst[attention.VARLEN]:.1e}"
    )


def varlen_vs_sdpa() -> None:
    class Attn(torch.nn.Module):
        is_causal = True

    lengths = [300, 17, 1024, 64, 1]
    g = torch.Generator().manual_seed(0)
    t = sum(lengths)
    q, k, v = (torch.randn(1, h, t, 64, generator=g) for h in (8, 2, 2))
    pos = torch.tensor([[i for n in lengths for i in range(n)]])
    out, _ = attention.varlen_attention_forward(
        Attn(), q, k, v, None, scaling=0.125, **packing.packed_kwargs(pos)
    )
    k2, v2 = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
    ref, s = [], 0
    for n in lengths:
        ref.append(
            torch.nn.functional.scaled_dot_product_attention(
                q[:, :, s : s + n], k2[:, :, s : s + n], v2[:, :, s : s + n], is_causal=True, scale=0.125
            )
        )
        s += n
    diff = (out - torch.cat(ref, 2).transpose(1, 2)).abs().max()
    print(
        f"varlen attention (per-sequence path, GQA 8/2, 5 sequences 1..1024) vs SDPA per sequence: "
        f"max |diff| {float(diff):.1e}"
    )


def compiled(tmp: Path) -> None:
    """The demo, 8 steps, plain against train.torch_compile with inductor (C++ kernels on the CPU:
    a minute or two the first time, cached after) and with the eager backend (dynamo capture only)."""
    losses = {}
    for backend in (None, "inductor", "eager"):
        sets = {"train__torch_compile": True, "train__torch_compile_backend": backend} if backend else {}
        events, _ = run(make_cfg(tmp / f"compile-{backend}", train__max_steps=8, **sets))
        losses[backend] = [e.loss for e in steps(events).values()]
    worst = {
        b: max(abs(x - y) for x, y in zip(losses[None], losses[b], strict=True))
        for b in ("inductor", "eager")
    }
    print(
        f"torch_compile vs eager, 8 steps on the demo, batch 4, fp32 CPU: max |loss diff| "
        f"inductor {worst['inductor']:.1e}, eager backend {worst['eager']:.1e}"
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        runs(Path(d))
        compiled(Path(d))
    per_example()
    varlen_vs_sdpa()
