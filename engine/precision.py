"""Mixed precision around the model's forward passes.

bf16 autocast on CUDA when the weights are bf16: LoRA's fp32 adapters then compute in bf16 as under
``TrainingArguments(bf16=True)``, with fp32 master weights and optimizer state, and without peft's
cast of each adapter input to fp32 and back.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch

_lora_layers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _peft_layers(model: torch.nn.Module) -> list[Any]:
    """The model's peft adapter layers (found once per model)."""
    if model not in _lora_layers:
        try:
            from peft.tuners.tuners_utils import BaseTunerLayer
        except ImportError:
            _lora_layers[model] = []
        else:
            _lora_layers[model] = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    return _lora_layers[model]


@contextlib.contextmanager
def autocast(
    device: torch.device, dtype: torch.dtype, model: torch.nn.Module | None = None
) -> Iterator[None]:
    """bf16 autocast where the weights are bf16 on CUDA (as HF's ``bf16=True``); otherwise nothing.

    Inside it, peft's LoRA layers skip casting their input to the fp32 adapter dtype: autocast casts
    it straight back to bf16 for the matmul, so the round trip only costs two passes over the
    activations per adapted layer (the values reaching the matmul are the same bf16 numbers).
    """
    if not (device.type == "cuda" and dtype == torch.bfloat16):
        yield
        return
    layers = _peft_layers(model) if model is not None else []
    saved = [getattr(m, "cast_input_dtype_enabled", True) for m in layers]
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            yield
    finally:
        for m, value in zip(layers, saved, strict=True):
            m.cast_input_dtype_enabled = value
