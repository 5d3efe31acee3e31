"""QLoRA on the CPU: the course preset (4-bit NF4 with double quantisation, paged_adamw_32bit) on
builtin:tiny, through bitsandbytes' CPU backend; and the one-line refusals where bitsandbytes is
missing, too old or without the device."""

from __future__ import annotations

import copy
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from tests.engine.helpers import of, run, steps
from tunedeck.engine import builtin, cli, kbit, optim
from tunedeck.engine import config as config_mod
from tunedeck.engine import model as model_mod
from tunedeck.engine.protocol import Eval, Set

bnb = pytest.importorskip("bitsandbytes")

PRESET = Path(__file__).resolve().parents[2] / "resources" / "presets" / "course-qlora.yaml"
STEPS = 16


def course_cfg(tmp_path: Path, **overrides) -> config_mod.Config:
    """The course preset as it ships, on builtin:tiny, for a few steps."""
    sets = {
        "model.name_or_path": "builtin:tiny",
        "train.output_dir": str(tmp_path / "runs"),
        "train.max_steps": STEPS,
        "train.eval_steps": 1000,  # no periodic eval: the one at the end only
        "train.save_steps": STEPS // 2,
    }
    sets.update({k.replace("__", "."): v for k, v in overrides.items()})
    return config_mod.apply_overrides(config_mod.load(PRESET), [f"{k}={v}" for k, v in sets.items()])


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """One run of the preset, with an eval before the first step to compare the last one with."""
    return run(course_cfg(tmp_path_factory.mktemp("course")), at={0: [Eval()]})


def test_the_course_recipe_is_what_runs(course):
    events, trainer = course
    assert events[-1].status == "completed" and not of(events, "error")
    layers = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 4 * 4 + 4 * 3  # q/k/v/o and the MLP's three, in each of 4 blocks
    for layer in layers:
        state = layer.weight.quant_state
        assert layer.weight.dtype == torch.uint8 and state.quant_type == "nf4"
        assert state.nested  # double quantisation: the block scales are quantised too
        assert layer.compute_dtype == torch.float32  # fp32 compute on the CPU
    opt = trainer.optimizer
    assert isinstance(opt, bnb.optim.AdamW) and opt.is_paged and opt.args.optim_bits == 32
    assert trainer.cfg.model.gradient_checkpointing and trainer.model.is_activation_checkpointing
    start = of(events, "start")[0]
    assert start.model["dtype"] == "float32" and start.model["device"] == "cpu"
    assert start.model["optimizer"] == "paged_adamw_32bit"


def test_the_loss_falls(course):
    events, _ = course
    losses = [e.loss for e in of(events, "step")]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    before, after = (e.eval_loss for e in of(events, "eval"))
    assert [e.step for e in of(events, "eval")] == [0, STEPS]
    assert after < before - 0.03, (before, after)  # measured 6.020 -> 5.964 at the preset's 1e-4
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4


def test_resume_is_exact(course):
    events, trainer = course
    ckpt = trainer.run_dir / "checkpoints" / f"step-{STEPS // 2:06d}"
    resumed, _ = run(None, resume_from=ckpt)
    a, b = steps(events), steps(resumed)
    assert sorted(b) == list(range(STEPS // 2 + 1, STEPS + 1))
    assert [b[s].loss for s in b] == [a[s].loss for s in b]
    assert [b[s].learning_rate for s in b] == [a[s].learning_rate for s in b]


def test_the_adapter_loads_with_plain_peft_on_a_4bit_base(course):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _, trainer = course
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(
        builtin.tiny_model_dir(), dtype=torch.float32, quantization_config=quant, device_map={"": "cpu"}
    )
    plain = PeftModel.from_pretrained(base, trainer.run_dir / "final").eval()
    # bitsandbytes' own CPU inference path (bf16, AVX512-BF16 CPUs) refuses builtin:tiny's 352-wide MLP;
    # the fp32 path is the one both sides train with (see kbit.same_numbers_in_eval).
    kbit.same_numbers_in_eval(plain)
    ids = trainer.tokenizer("Upper: cloud\n", return_tensors="pt").input_ids
    trainer.model.eval()
    with torch.no_grad():
        ours, theirs = trainer.model(input_ids=ids).logits, plain(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    with plain.disable_adapter(), torch.no_grad():
        untrained = plain(input_ids=ids).logits
    assert (ours - untrained).abs().max() > 1e-3  # the adapter is trained, not the identity


def test_swaps_to_and_from_8bit_follow_the_state_rules(tmp_path, monkeypatch):
    """paged_adamw_32bit -> adamw_8bit -> paged_adamw_32bit: fresh each time (8-bit moments are
    block-quantised); -> adamw_torch: the fp32 moments and step count carry over exactly."""
    swaps = []
    real = optim.swap

    def frozen(state):
        return {p: {k: copy.deepcopy(v) for k, v in st.items()} for p, st in state.items()}

    def spy(old, old_name, new_name, train, weight_decay):
        new, carried = real(old, old_name, new_name, train, weight_decay)
        # Each side's state as it is at the swap (the steps after it change them in place).
        swaps.append((old_name, new_name, carried, frozen(old.state), frozen(new.state)))
        return new, carried

    monkeypatch.setattr(optim, "swap", spy)
    events, trainer = run(
        course_cfg(tmp_path, train__max_steps=8, train__save_steps=0, train__eval_steps=0),
        at={
            2: [Set({"optim": "adamw_8bit"})],
            4: [Set({"optim": "paged_adamw_32bit"})],
            6: [Set({"optim": "adamw_torch"})],
        },
    )
    assert events[-1].status == "completed"
    assert all(math.isfinite(e.loss) for e in of(events, "step"))
    assert [(a, b, c) for a, b, c, _, _ in swaps] == [
        ("paged_adamw_32bit", "adamw_8bit", False),
        ("adamw_8bit", "paged_adamw_32bit", False),
        ("paged_adamw_32bit", "adamw_torch", True),
    ]
    fresh = [w.message for w in of(events, "warning") if "starts fresh" in w.message]
    assert [m.split(":")[0] for m in fresh] == [
        "paged_adamw_32bit -> adamw_8bit",
        "adamw_8bit -> paged_adamw_32bit",
    ]
    # The 8-bit optimizer kept 8-bit moments (a 32 x 128 LoRA A has 4096 values) and counted its own 2 steps.
    p = next(p for p in trainer.trainable if p.numel() >= 4096)
    eight = swaps[1][3][p]
    assert eight["state1"].dtype == torch.uint8 and eight["step"] == 2
    assert not swaps[0][4] and not swaps[1][4]  # the optimizers after them started empty
    # paged_adamw_32bit (steps 5, 6) -> adamw_torch: the same moments, and a count that goes on.
    paged, carried = swaps[2][3][p], swaps[2][4][p]
    assert paged["step"] == 2 and float(carried["step"]) == 2
    assert torch.equal(carried["exp_avg"], paged["state1"]) and torch.equal(
        carried["exp_avg_sq"], paged["state2"]
    )
    assert float(trainer.optimizer.state[p]["step"]) == 4  # 2 carried + steps 7 and 8


def test_an_8bit_base_trains_on_the_cpu(tmp_path):
    events, trainer = run(
        course_cfg(
            tmp_path,
            model__load_in_4bit=False,
            model__load_in_8bit=True,
            train__optim="adamw_8bit",
            train__max_steps=2,
            train__save_steps=0,
            train__eval_steps=0,
        )
    )
    assert events[-1].status == "completed"
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in trainer.model.modules())
    assert all(math.isfinite(e.loss) for e in of(events, "step"))


def test_4bit_computes_in_fp32_on_the_cpu_and_refuses_half_precision(tmp_path):
    cpu = torch.device("cpu")
    cfg = course_cfg(tmp_path)
    q = model_mod.quantization_config(cfg, model_mod.resolve_dtype(cfg.model.dtype, cpu), cpu)
    assert (q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant, q.bnb_4bit_compute_dtype) == (
        "nf4",
        True,
        torch.float32,
    )
    with pytest.raises(Exception) as e:
        model_mod.resolve_dtype("bfloat16", cpu)
    assert e.value.one_line() == (
        "model.dtype=bfloat16 is not supported for training on the CPU (use model.dtype=auto)"
    )


# ---------------------------------------------------------------- where bitsandbytes cannot run


@pytest.fixture
def fake_bnb(monkeypatch):
    """Put ``module`` where ``import bitsandbytes`` finds it (None: not installed)."""

    def install(module):
        monkeypatch.setitem(sys.modules, "bitsandbytes", module)
        kbit._import.cache_clear()
        kbit.problem.cache_clear()

    yield install
    monkeypatch.undo()
    kbit._import.cache_clear()
    kbit.problem.cache_clear()


def _no_cpu_kernel(*args, **kwargs):
    raise RuntimeError("no kernel image for the cpu")


@pytest.mark.parametrize(
    ("module", "setting", "line"),
    [
        (
            None,
            "model.load_in_4bit=true",
            "model.load_in_4bit=true needs bitsandbytes on the cpu: bitsandbytes is not installed "
            "(pip install -U 'bitsandbytes>=0.49')",
        ),
        (
            types.SimpleNamespace(__version__="0.42.0"),
            "train.optim=paged_adamw_32bit",
            "train.optim=paged_adamw_32bit needs bitsandbytes on the cpu: bitsandbytes 0.42.0 is too old "
            "(it needs 0.49 or newer) (pip install -U 'bitsandbytes>=0.49')",
        ),
        (
            types.SimpleNamespace(
                __version__="0.50.0",
                nn=types.SimpleNamespace(Linear4bit=_no_cpu_kernel, Linear8bitLt=_no_cpu_kernel),
            ),
            "model.load_in_8bit=true",
            "model.load_in_8bit=true needs bitsandbytes on the cpu: bitsandbytes 0.50.0 has no cpu support "
            "here (no kernel image for the cpu) (set model.load_in_8bit=false on this machine)",
        ),
    ],
)
def test_where_bitsandbytes_cannot_run_one_line_names_the_fix(
    fake_bnb, capsys, tmp_path, module, setting, line
):
    fake_bnb(module)
    key, value = setting.split("=")
    code = cli.main(["--set", f"{key}={value}", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"tunedeck-train: error: {line}"]
    assert not any(tmp_path.iterdir())
