"""Every setting of a run, as documented dataclasses, with validation and YAML round-trips.

Names follow HF ``TrainingArguments`` and peft where they exist, so a user's habits carry over.
Each field's metadata holds a plain-words ``help`` (the GUI shows it as a tooltip) and, where the
value comes from a fixed list, its ``choices``. Validation refuses anything else with a message
that names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunedeck.engine.errors import ConfigError

OPTIM_NAMES = (
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "adafactor",
    "sgd",
    "rmsprop",
)
SCHEDULER_NAMES = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)
FORMAT_NAMES = ("auto", "prompt_completion", "alpaca", "messages", "text", "tokenized")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
ATTN_NAMES = ("sdpa", "eager", "flash_attention_2")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DISTRIBUTED_NAMES = ("ddp", "fsdp")

# What can change while a run goes (DESIGN.md, "Commands and live changes").
LIVE_KEYS = (
    "learning_rate",
    "lr_scheduler_type",
    "gradient_accumulation_steps",
    "per_device_train_batch_size",
    "optim",
    "max_grad_norm",
    "weight_decay",
    "eval_steps",
    "save_steps",
)


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None, **kw: Any) -> Any:
    meta: dict[str, Any] = {"help": help}
    if choices:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):

        def fresh() -> Any:  # each config gets its own copy of a mutable default
            return type(default)(default)

        return field(default_factory=fresh, metadata=meta)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ModelConfig:
    name_or_path: str = _f(
        "builtin:tiny",
        "Which model to fine-tune: a Hugging Face hub id, a local folder saved with save_pretrained, "
        "or builtin:tiny (a small model that runs anywhere, for trying things out).",
    )
    dtype: str = _f(
        "auto",
        "Number format of the weights. auto: bfloat16 on a GPU that supports it, else float32. "
        "Lower precision halves memory and speeds up matrix maths.",
        DTYPE_NAMES,
    )
    load_in_4bit: bool = _f(
        False,
        "QLoRA: store the frozen base weights in 4-bit NF4 with double quantisation (bitsandbytes, on a "
        "GPU or the CPU). About a quarter of the memory of bf16; the LoRA adapters still train in higher "
        "precision (bf16 compute on a GPU that has it, fp32 on the CPU).",
    )
    load_in_8bit: bool = _f(
        False, "Store the frozen base weights in 8 bits (bitsandbytes, on a GPU or the CPU)."
    )
    gradient_checkpointing: bool = _f(
        False,
        "Keep fewer activations from the forward pass and recompute them during backpropagation: "
        "much less memory for about 30% more time per step.",
    )
    attn_implementation: str = _f(
        "sdpa", "Attention kernel. sdpa is PyTorch's fused attention and works everywhere.", ATTN_NAMES
    )
    trust_remote_code: bool = _f(
        False, "Run Python code shipped with a hub model. Only for models whose authors you trust."
    )


@dataclass
class LoraConfig:
    enabled: bool = _f(
        True,
        "Train small low-rank adapters (LoRA) next to frozen weights instead of every weight. "
        "Off: full fine-tuning, which needs memory for gradients and optimizer state of the whole model.",
    )
    r: int = _f(32, "Rank of each adapter: more rank, more capacity and more trainable parameters.")
    alpha: float = _f(64, "Adapter scale: the update is multiplied by alpha / r.")
    dropout: float = _f(
        0.1, "Dropout on the adapter input during training; a regulariser against overfitting."
    )
    target_modules: Any = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        "Which layers get adapters: a list of module names, or all-linear for every linear layer "
        "except the output head.",
    )


@dataclass
class DataConfig:
    path: str = _f(
        "builtin:demo",
        "Training data: a .jsonl, .json, .csv or .parquet file, a hub dataset name, or builtin:demo.",
    )
    format: str = _f(
        "auto",
        "How examples are laid out: prompt/completion, alpaca (instruction/input/output), chat "
        "messages, plain text, or tokenized (input_ids and optional labels, already token ids). "
        "auto detects it from the columns.",
        FORMAT_NAMES,
    )
    max_length: int = _f(
        512, "Longest example in tokens; longer ones are cut. Memory per step grows with it."
    )
    completion_only_loss: bool = _f(
        True,
        "Compute the loss only on the answer tokens, so the model learns to answer rather than to "
        "repeat prompts.",
    )
    packing: bool = _f(
        False,
        "Put the examples of a batch end to end in one row, with no padding and no attention across "
        "examples: no compute is spent on pad tokens.",
    )
    eval_fraction: float = _f(0.05, "Share of the examples held out to measure eval loss (0 for none).")
    split: str = _f("train", "Which split of a hub dataset to use.")


@dataclass
class TrainConfig:
    learning_rate: float = _f(
        1.0e-4, "Peak step size of the optimizer. Too high diverges, too low barely moves. Live."
    )
    lr_scheduler_type: str = _f(
        "cosine",
        "Shape of the learning rate over the run after warm-up (cosine decays smoothly to zero). Live: "
        "a new shape takes over from the current learning rate.",
        SCHEDULER_NAMES,
    )
    lr_scheduler_kwargs: dict = _f(
        {}, "Extra schedule settings as in HF, e.g. min_lr_rate for cosine_with_min_lr, num_cycles, power."
    )
    warmup_ratio: float = _f(
        0.03,
        "Share of the steps over which the learning rate ramps up from 0, which steadies early training.",
    )
    warmup_steps: int = _f(0, "Warm-up in steps; overrides warmup_ratio when above 0.")
    optim: str = _f(
        "adamw_torch",
        "Optimizer. AdamW keeps two moments per trainable weight (8 bytes each in fp32); 8-bit and paged "
        "variants save memory; sgd keeps none. Live: the new optimizer carries Adam moments over.",
        OPTIM_NAMES,
    )
    per_device_train_batch_size: int = _f(
        4,
        "Examples per forward/backward pass. Memory grows with it; raise accumulation instead if short. "
        "Live: the next step takes the new size, and the data goes on from the same example.",
    )
    per_device_eval_batch_size: int = _f(8, "Examples per forward pass when evaluating.")
    gradient_accumulation_steps: int = _f(
        1,
        "Forward/backward passes whose gradients add up before one optimizer step: a larger effective batch "
        "with the memory of one pass. Live.",
    )
    num_train_epochs: float = _f(1.0, "Passes over the training data.")
    max_steps: int = _f(-1, "Stop after this many optimizer steps; -1 to use num_train_epochs.")
    max_grad_norm: float = _f(
        1.0, "Clip the gradient to this norm before each step to tame loss spikes (0 turns it off). Live."
    )
    weight_decay: float = _f(0.0, "Pull weights towards zero a little each step (decoupled, as AdamW). Live.")
    adam_beta1: float = _f(0.9, "Adam's momentum decay.")
    adam_beta2: float = _f(0.999, "Adam's second-moment decay.")
    adam_epsilon: float = _f(1.0e-8, "Adam's denominator guard.")
    seed: int = _f(42, "Random seed for weights of the adapters, shuffling and dropout.")
    logging_steps: int = _f(1, "Report a step event every this many optimizer steps.")
    eval_steps: int = _f(50, "Evaluate every this many steps (0: only when asked). Live.")
    save_steps: int = _f(200, "Save a checkpoint every this many steps (0: only when asked). Live.")
    save_total_limit: int = _f(0, "Keep only this many newest periodic checkpoints (0 keeps all).")
    output_dir: str = _f("runs", "Folder where each run gets its own sub-folder.")
    run_name: str = _f("", "Name of the run folder; empty for a time stamp.")
    use_liger_kernel: bool = _f(
        True,
        "Use Liger's fused Triton kernels when installed on a CUDA machine: less memory, more tokens/s.",
    )
    torch_compile: bool = _f(
        False,
        "Compile the model with torch.compile: faster steps on a GPU once the first steps have compiled it "
        "(new batch shapes and evaluation recompile, so short runs and the CPU rarely gain).",
    )
    torch_compile_backend: str = _f(
        "inductor",
        "torch.compile backend when torch_compile is on: inductor generates fused kernels; "
        "aot_eager only traces (a quick check that the model compiles).",
        COMPILE_BACKENDS,
    )
    autopilot: list = _f(
        [],
        "Rules that watch the run and act through the same commands you could send: loss_spike and "
        "nonfinite roll back to a checkpoint and lower the learning rate, early_stopping stops on the best "
        "eval, plateau lowers the learning rate. A list, e.g. [{rule: loss_spike, ratio: 2.0}]. Live: "
        "switch rules on and off.",
    )
    torch_compile_mode: str = _f(
        "default",
        "inductor's mode when torch_compile is on: reduce-overhead adds CUDA graphs (fixed shapes "
        "only), max-autotune searches kernels for longer.",
        COMPILE_MODES,
    )
    distributed: str = _f(
        "ddp",
        "How several processes (tunedeck-train --nproc-per-node N, or torchrun) share the work. ddp: each "
        "process holds the whole model and they average gradients. fsdp: FSDP2 shards the weights, "
        "gradients and optimizer state over the processes, for a model that does not fit one GPU. One "
        "process ignores it.",
        DISTRIBUTED_NAMES,
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def copy(self) -> Config:
        return from_dict(self.to_dict())

    def section(self, name: str) -> Any:
        return getattr(self, name)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "train": TrainConfig,
}


def field_help(section: str, key: str) -> str:
    return _field(section, key).metadata.get("help", "")


def field_choices(section: str, key: str) -> tuple[str, ...] | None:
    return _field(section, key).metadata.get("choices")


def field_type(section: str, key: str) -> Any:
    return _hints(section)[key]


@functools.cache
def _hints(section: str) -> dict[str, Any]:
    # get_type_hints re-evaluates every annotation; the GUI validates on each keystroke.
    return typing.get_type_hints(SECTIONS[section])


def _field(section: str, key: str) -> dataclasses.Field:
    if section not in SECTIONS:
        raise ConfigError(f"unknown section {section!r}", f"use one of {', '.join(SECTIONS)}")
    for f in dataclasses.fields(SECTIONS[section]):
        if f.name == key:
            return f
    names = ", ".join(f.name for f in dataclasses.fields(SECTIONS[section]))
    raise ConfigError(f"unknown key {section}.{key}", f"{section} takes: {names}")


def coerce(section: str, key: str, value: Any) -> Any:
    """Turn ``value`` into the type of ``section.key`` or raise a ConfigError saying why."""
    typ = field_type(section, key)
    where = f"{section}.{key}"
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in (
                "true",
                "false",
                "yes",
                "no",
                "on",
                "off",
                "1",
                "0",
            ):
                return value.lower() in ("true", "yes", "on", "1")
            raise ValueError
        if typ is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            return int(number)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if math.isnan(out):
                raise ValueError
            return out
        if typ is str:
            if isinstance(value, (dict, list)) or value is None:
                raise ValueError
            return str(value)
        if typ is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value) or {}
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        kind = {
            bool: "true or false",
            int: "a whole number",
            float: "a number",
            str: "text",
            dict: "a mapping",
        }
        raise ConfigError(
            f"{where}={value!r} is not {kind.get(typ, typ)}", f"give {where} {kind.get(typ, typ)}"
        ) from None
    return value  # typing.Any: checked by validate()


def _range(where: str, value: float, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{where}={value!r} is out of range", f"{where} must be {allowed}")


def _plain_name(name: str) -> bool:
    """A name that stays one folder inside train.output_dir."""
    return name == "" or not ("/" in name or "\\" in name or "\0" in name or name.strip(".") == "")


def validate_value(section: str, key: str, value: Any) -> Any:
    """Coerce and check one value; return it in its proper type."""
    value = coerce(section, key, value)
    where = f"{section}.{key}"
    choices = field_choices(section, key)
    if choices and value not in choices:
        raise ConfigError(f"{where}={value!r} is not a known choice", f"allowed: {', '.join(choices)}")
    checks: dict[str, tuple[Any, str]] = {
        "lora.r": (lambda v: v >= 1, "a whole number >= 1"),
        "lora.alpha": (lambda v: v > 0, "> 0"),
        "lora.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "data.max_length": (lambda v: v >= 8, "a whole number >= 8"),
        "data.eval_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "data.path": (lambda v: bool(v.strip()), "a file, a hub dataset name or builtin:demo"),
        "model.name_or_path": (lambda v: bool(v.strip()), "a hub id, a local folder or builtin:tiny"),
        "train.learning_rate": (lambda v: 0 < v < 1, "> 0 and < 1 (typical LoRA: 1e-4 to 3e-4)"),
        "train.warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "train.warmup_steps": (lambda v: v >= 0, ">= 0"),
        "train.per_device_train_batch_size": (lambda v: v >= 1, "a whole number >= 1"),
        "train.per_device_eval_batch_size": (lambda v: v >= 1, "a whole number >= 1"),
        "train.gradient_accumulation_steps": (lambda v: 1 <= v <= 4096, "a whole number from 1 to 4096"),
        "train.num_train_epochs": (lambda v: 0 < v < math.inf, "a finite number > 0"),
        "train.max_steps": (lambda v: v == -1 or v >= 1, "-1 (use epochs) or >= 1"),
        "train.max_grad_norm": (lambda v: v >= 0, ">= 0 (0 turns clipping off)"),
        "train.weight_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "train.adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "train.adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "train.adam_epsilon": (lambda v: v > 0, "> 0"),
        "train.logging_steps": (lambda v: v >= 1, "a whole number >= 1"),
        "train.eval_steps": (lambda v: v >= 0, ">= 0 (0: only on request)"),
        "train.save_steps": (lambda v: v >= 0, ">= 0 (0: only on request)"),
        "train.save_total_limit": (lambda v: v >= 0, ">= 0 (0 keeps all)"),
        # numpy's and HF's set_seed take at most 32 bits; torch's generator at most 64.
        "train.seed": (lambda v: 0 <= v < 2**32, "a whole number from 0 to 4294967295"),
    }
    if where in checks:
        ok, allowed = checks[where]
        _range(where, value, ok(value), allowed)
    if where == "train.run_name" and not _plain_name(value):
        raise ConfigError(
            f"train.run_name={value!r} is not a plain folder name (a run folder lies directly in "
            "train.output_dir)",
            "give a name without /, \\ or .., or leave it empty for a time stamp",
        )
    if where == "train.autopilot":
        # Imported here: autopilot builds protocol commands, and protocol imports this module.
        from tunedeck.engine.autopilot import check_rules

        return check_rules(value)
    if where == "lora.target_modules":
        if isinstance(value, str):
            value = value.strip()
            if value != "all-linear":
                value = [m.strip() for m in value.split(",") if m.strip()]
        if isinstance(value, (list, tuple)):
            if not value or not all(isinstance(m, str) and m for m in value):
                raise ConfigError(
                    f"lora.target_modules={value!r} is not a list of module names",
                    "give names such as [q_proj, v_proj], or all-linear",
                )
            value = list(value)
        elif value != "all-linear":
            raise ConfigError(
                f"lora.target_modules={value!r} is not a list of module names",
                "give names such as [q_proj, v_proj], or all-linear",
            )
    return value


def problem(section: str, key: str, value: Any) -> str | None:
    """The one-line refusal of ``value`` for ``section.key``, or None when it is valid."""
    try:
        validate_value(section, key, value)
    except ConfigError as e:
        return e.one_line()
    return None


def validate(cfg: Config) -> Config:
    """Check every value and the rules between them; return ``cfg`` with values coerced."""
    for name in SECTIONS:
        sec = cfg.section(name)
        for f in dataclasses.fields(sec):
            setattr(sec, f.name, validate_value(name, f.name, getattr(sec, f.name)))
    if cfg.model.load_in_4bit and cfg.model.load_in_8bit:
        raise ConfigError(
            "model.load_in_4bit and model.load_in_8bit are both true", "choose one quantization"
        )
    if (cfg.model.load_in_4bit or cfg.model.load_in_8bit) and not cfg.lora.enabled:
        raise ConfigError(
            "a quantized base model cannot be fully fine-tuned (lora.enabled=false)",
            "set lora.enabled=true (QLoRA) or turn quantization off",
        )
    t = cfg.train
    if t.torch_compile_mode != "default" and t.torch_compile_backend != "inductor":
        raise ConfigError(
            f"train.torch_compile_mode={t.torch_compile_mode} is a mode of the inductor backend, "
            f"not of {t.torch_compile_backend}",
            "set train.torch_compile_backend=inductor, or train.torch_compile_mode=default",
        )
    return cfg


def from_dict(data: dict[str, Any] | None) -> Config:
    """Build a validated Config from nested dicts; unknown sections and keys are errors."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"a config must be a mapping of sections, got {type(data).__name__}",
            f"use sections {', '.join(SECTIONS)}",
        )
    cfg = Config()
    for name, values in data.items():
        if name not in SECTIONS:
            raise ConfigError(f"unknown section {name!r}", f"use one of {', '.join(SECTIONS)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(
                f"section {name!r} must be a mapping, got {values!r}", f"write it as {name}: {{key: value}}"
            )
        sec = cfg.section(name)
        for key, value in values.items():
            _field(name, key)
            setattr(sec, key, value)
    return validate(cfg)


def load(path: str | Path) -> Config:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist", "check the path")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p} is not valid YAML{at}", "fix the YAML syntax") from None
    return from_dict(data)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML, atomically and synced (a crash leaves the old file or the new one)."""
    from tunedeck.engine import durable

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    durable.write_text(p, dump(cfg))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings (values parsed as YAML) and validate the result."""
    data = cfg.to_dict()
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(
                f"--set {item!r} is not section.key=value", "write e.g. --set train.learning_rate=2e-4"
            )
        dotted, raw = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        _field(section, key)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        data[section][key] = value
    return from_dict(data)


def diff(a: Config, b: Config) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two configs."""
    out = {}
    da, db = a.to_dict(), b.to_dict()
    for s in SECTIONS:
        for k, v in da[s].items():
            if db[s][k] != v:
                out[f"{s}.{k}"] = (v, db[s][k])
    return out
