"""Padding-free attention for packed batches, registered with transformers as ``tunedeck_varlen``.

On CUDA it calls PyTorch's own varlen flash kernel (``torch.nn.attention.varlen.varlen_attn``) with
cumulative sequence lengths, so attention costs what the real tokens cost and never crosses an
example boundary. transformers builds no mask for it (the name has no mask function), which also
saves the dense block-diagonal mask it would otherwise build for SDPA. Where the kernel cannot run
(the CPU, an old torch, fp32, odd head sizes) the same function runs SDPA once per example, which is
exact too. The trainer uses the kernel on CUDA and the per-example form on the CPU (where it beats
the block mask: see docs/BENCHMARKS.md); on CUDA without the kernel packed batches keep SDPA with
transformers' block-diagonal mask.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from tunedeck.engine.packing import CU_K, CU_Q, MAX_K, MAX_Q, cu_seqlens

VARLEN = "tunedeck_varlen"


@functools.cache
def varlen_kernel() -> tuple[Any, dict[str, bool]] | None:
    """``(varlen_attn, features)`` of this torch, or None. Its signature changed across versions:
    causal is ``is_causal=True`` in 2.10, ``window_size=(-1, 0)`` later; ``scale`` and ``enable_gqa``
    came later still."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    features = kernel_features(varlen_attn)
    return (varlen_attn, features) if features is not None else None


def kernel_features(fn: Any) -> dict[str, bool] | None:
    """Which keywords a ``varlen_attn`` takes; None when it has no way to ask for causal attention."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    features = {name: name in params for name in ("window_size", "is_causal", "scale", "enable_gqa")}
    return features if features["window_size"] or features["is_causal"] else None


def register() -> str:
    """Register ``tunedeck_varlen`` with transformers (idempotent); returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    return VARLEN


def varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the varlen flash kernel can run here: CUDA, a torch that has it, half precision."""
    return device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and varlen_kernel() is not None


# The position ids last derived from (held, so their memory cannot be reused under the same address).
_derived: dict[str, Any] = {"ids": None, "version": -1, "value": None}


def _derive_on_device(position_ids: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """For callers that pass only position ids: derive once per forward (every layer gets the same
    tensor object), at the cost of one sync. None when the batch is a single sequence per row."""
    if _derived["ids"] is not position_ids or _derived["version"] != position_ids._version:
        cu, max_len = cu_seqlens(position_ids)
        packed = cu.numel() - 1 > position_ids.reshape(-1, position_ids.shape[-1]).shape[0]
        _derived.update(
            ids=position_ids, version=position_ids._version, value=(cu, max_len) if packed else None
        )
    return _derived["value"]


def _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=is_causal,
        **kwargs,
    )


def _per_sequence(query, key, value, cu: list[int], dropout: float, scaling: float | None) -> torch.Tensor:
    """Exact varlen attention from SDPA, once per sequence. In: [1, H, T, D]; out: [1, T, H, D]."""
    gqa: dict[str, Any] = {}
    if query.shape[1] != key.shape[1]:
        if _sdpa_has_gqa():
            gqa["enable_gqa"] = True
        else:
            key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
            value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    outs = []
    for s, e in zip(cu[:-1], cu[1:], strict=True):
        outs.append(
            torch.nn.functional.scaled_dot_product_attention(
                query[:, :, s:e],
                key[:, :, s:e],
                value[:, :, s:e],
                dropout_p=dropout,
                is_causal=True,
                scale=scaling,
                **gqa,
            )
        )
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


@functools.cache
def _sdpa_has_gqa() -> bool:
    q = torch.zeros(1, 2, 2, 8)
    k = torch.zeros(1, 1, 2, 8)
    try:
        torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
    except (TypeError, RuntimeError):
        return False
    return True


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: [B, H, T, D] in, [B, T, H, D] out.

    Packed input (cumulative lengths in kwargs, or position ids that restart) gets causal attention
    within each sequence; anything else (generation with a KV cache, a plain unpadded batch, an
    explicit mask) goes to SDPA unchanged.
    """
    cu = kwargs.pop(CU_Q, None)
    max_len = kwargs.pop(MAX_Q, None)
    kwargs.pop(CU_K, None)
    kwargs.pop(MAX_K, None)
    plain = (
        attention_mask is not None
        or query.shape[2] != key.shape[2]
        or is_causal is False
        or not getattr(module, "is_causal", True)
    )
    if not plain and cu is None and kwargs.get("position_ids") is not None:
        derived = _derive_on_device(kwargs["position_ids"])
        if derived is not None:
            cu, max_len = derived
    if plain or cu is None:
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    kernel = varlen_kernel()
    if kernel is None or not _kernel_ok(query, dropout, scaling, kernel[1]):
        if b != 1:
            query, key, value = (
                x.transpose(0, 1).reshape(1, x.shape[1], b * t, d) for x in (query, key, value)
            )
        cu_list = cu.tolist() if isinstance(cu, torch.Tensor) else list(cu)
        out = _per_sequence(query, key, value, cu_list, dropout, scaling)
        return out.reshape(b, t, hq, d), None
    fn, features = kernel
    q = query.transpose(1, 2).reshape(b * t, hq, d)
    k = key.transpose(1, 2).reshape(b * t, hkv, d)
    v = value.transpose(1, 2).reshape(b * t, hkv, d)
    extra: dict[str, Any] = {}
    if features["enable_gqa"]:
        extra["enable_gqa"] = hq != hkv
    elif hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    if features["scale"] and scaling is not None:
        extra["scale"] = scaling
    if features["window_size"]:
        extra["window_size"] = (-1, 0)
    else:
        extra["is_causal"] = True
    if cu.device != q.device:
        cu = cu.to(q.device, non_blocking=True)
    if max_len is None:
        max_len = t
    out = fn(q, k, v, cu, cu, int(max_len), int(max_len), **extra)
    return out.reshape(b, t, hq, d), None


def _kernel_ok(query: torch.Tensor, dropout: float, scaling: float | None, features: dict[str, bool]) -> bool:
    """What the flash varlen kernel takes: CUDA, half precision, head size a multiple of 8 up to 256,
    no attention dropout, and the default scale unless it takes ``scale``."""
    d = query.shape[-1]
    default_scale = scaling is None or abs(scaling - d**-0.5) < 1e-12
    return (
        query.device.type == "cuda"
        and query.dtype in (torch.bfloat16, torch.float16)
        and dropout == 0
        and d % 8 == 0
        and d <= 256
        and (features["scale"] or default_scale)
    )


def use_varlen(model: torch.nn.Module) -> bool:
    """Switch ``model`` (a PreTrainedModel, maybe inside a PeftModel) to ``tunedeck_varlen``."""
    register()
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    config = getattr(base, "config", None)
    if config is None or float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", VARLEN):
        return False  # eager or flash_attention_2 was asked for: the user's choice stands
    setter = getattr(base, "set_attn_implementation", None)
    try:
        if setter is not None:
            setter(VARLEN)
        else:
            config._attn_implementation = VARLEN
    except (ValueError, KeyError, AttributeError):
        return False
    return getattr(config, "_attn_implementation", None) == VARLEN


def enable_varlen(
    model: torch.nn.Module, packing: bool, device: torch.device, dtype: torch.dtype
) -> str | None:
    """Switch packed batches to padding-free attention; returns how it runs, or None.

    ``varlen_attn``: the flash varlen kernel (CUDA, half precision). ``sdpa_per_sequence``: on the
    CPU, SDPA once per example, which costs the real tokens instead of the whole packed row squared
    that the block-diagonal mask costs. Elsewhere (CUDA without the kernel, or in fp32) packed
    batches keep SDPA with transformers' block-diagonal mask.
    """
    if not packing:
        return None
    if varlen_available(device, dtype):
        mode = "varlen_attn"
    elif device.type == "cpu":
        mode = "sdpa_per_sequence"
    else:
        return None
    return mode if use_varlen(model) else None
