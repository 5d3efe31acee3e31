"""Load the base model and tokenizer, and wrap it for LoRA, QLoRA or full fine-tuning.

Every model, the builtin one included, goes through ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunedeck.engine import builtin, liger, paths
from tunedeck.engine.config import Config
from tunedeck.engine.errors import ConfigError, ModelError


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    liger: bool = False
    liger_rope: bool = False

    def info(self) -> dict[str, Any]:
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {
            "params_total": total,
            "params_trainable": trainable,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "liger": self.liger,
            "liger_rope": self.liger_rope,
        }


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name in ("bfloat16", "float16") and device.type == "cpu":
        raise ConfigError(
            f"model.dtype={name} is not supported for training on the CPU", "use model.dtype=auto"
        )
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_path(name_or_path: str) -> str:
    if name_or_path == builtin.TINY:
        return str(builtin.tiny_model_dir())
    if name_or_path.startswith("builtin:"):
        raise ConfigError(f"model.name_or_path={name_or_path!r} is not a builtin model", "use builtin:tiny")
    p = Path(name_or_path).expanduser()
    missing = paths.missing_model(name_or_path)
    if missing is not None:
        raise missing
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise ModelError(
                f"{name_or_path} is not a model folder (no config.json)",
                "give a folder saved with save_pretrained, a hub id, or builtin:tiny",
            )
        return str(p)
    return name_or_path  # a hub id


def check_causal_lm(path: str, trust_remote_code: bool) -> None:
    """Refuse, before loading weights, a model that is not a causal language model."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return  # hub id: transformers reports that below
    cfg = json.loads(cfg_file.read_text())
    archs = cfg.get("architectures") or []
    if archs and not any(
        a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs
    ):
        raise ModelError(
            f"{path} holds a {archs[0]}, not a causal language model",
            "pick a decoder model (…ForCausalLM), e.g. a Llama, Qwen or Mistral checkpoint",
        )


def quantization_config(cfg: Config, dtype: torch.dtype) -> Any:
    if not (cfg.model.load_in_4bit or cfg.model.load_in_8bit):
        return None
    which = "model.load_in_4bit" if cfg.model.load_in_4bit else "model.load_in_8bit"
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{which}=true needs a CUDA GPU (bitsandbytes)", f"set {which}=false on this machine"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"{which}=true needs bitsandbytes, which is not installed", "pip install 'tunedeck[gpu]'"
        ) from None
    from transformers import BitsAndBytesConfig

    if cfg.model.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


@dataclass
class Base:
    """A base model as loaded, before any adapter: what training wraps and what sampling reuses."""

    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    quantized: bool


def load_base(cfg: Config, device: torch.device | None = None) -> Base:
    """The model of ``cfg.model`` and its tokenizer, through ``from_pretrained``, on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # Our own events report loading; transformers' progress bars would garble a terminal progress bar.
    hf_logging.disable_progress_bar()

    device = device or pick_device()
    dtype = resolve_dtype(cfg.model.dtype, device)
    path = resolve_path(cfg.model.name_or_path)
    check_causal_lm(path, cfg.model.trust_remote_code)
    quant = quantization_config(cfg, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
        model: Any = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            attn_implementation=cfg.model.attn_implementation,
            trust_remote_code=cfg.model.trust_remote_code,
            quantization_config=quant,
            device_map={"": device} if quant is not None else None,
        )
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"could not load model {cfg.model.name_or_path!r}: {first}",
            "check the hub id or folder, the network, and that it is a causal LM",
        ) from None
    if tokenizer.pad_token_id is None:
        # Padding positions carry no loss and no attention, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    if quant is None:
        model.to(device)
    return Base(model=model, tokenizer=tokenizer, device=device, dtype=dtype, quantized=quant is not None)


def load(cfg: Config, device: torch.device | None = None) -> Loaded:
    """The base model with Liger's kernels where they apply, wrapped for LoRA, QLoRA or full training."""
    base = load_base(cfg, device)
    applied = liger.apply(base.model, base.device) if cfg.train.use_liger_kernel else liger.Applied()
    model = wrap_for_training(base.model, cfg, quantized=base.quantized)
    return Loaded(
        model=model,
        tokenizer=base.tokenizer,
        device=base.device,
        dtype=base.dtype,
        liger=applied.kernels,
        liger_rope=applied.rope,
    )


def wrap_for_training(model: Any, cfg: Config, *, quantized: bool) -> torch.nn.Module:
    model.config.use_cache = False
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.model.gradient_checkpointing
        )
    elif cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora.enabled:
            model.enable_input_require_grads()
    if not cfg.lora.enabled:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lc = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,  # type: ignore[arg-type]  # annotated int; peft scales by alpha / r
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )
    try:
        with warnings.catch_warnings():
            # peft asks transformers 5 an attribute it deprecated; nothing for a user to act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, lc)
    except ValueError as e:
        raise ConfigError(
            f"lora.target_modules={cfg.lora.target_modules!r} does not match this model: "
            f"{str(e).splitlines()[0]}",
            "use names of its linear layers (e.g. q_proj, v_proj) or all-linear",
        ) from None
