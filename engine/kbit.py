"""Whether the installed bitsandbytes runs 4-bit/8-bit layers and its optimizers on a device.

bitsandbytes has had a CPU backend since 0.49 (4-bit NF4 and 8-bit layers, 8-bit and 32-bit
optimizers; "paged" optimizers run unpaged there), so QLoRA needs no GPU. Rather than trust a device
name, each feature is tried once per device on a few numbers: a layer's forward and backward, or one
optimizer step. What fails is refused before any work with one line naming the install command.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Any

import torch

from tunedeck.engine.errors import ConfigError

MIN_VERSION = "0.49"
INSTALL = f"pip install -U 'bitsandbytes>={MIN_VERSION}'"


class _Quiet(logging.Filter):
    """bitsandbytes' notes that ask nothing of a user: an optional CPU kernel package from the hub,
    and the fp16 cast of 8-bit matmul inputs (logged on every forward pass)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return "kernels-community" not in text and "inputs will be cast from" not in text


def _quiet_logs() -> None:
    for name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
        logging.getLogger(name).addFilter(_Quiet())
    # A paged optimizer on the CPU is the plain one; the start line names the optimizer already.
    warnings.filterwarnings(
        "ignore", message="Paged optimizers are not supported on CPU", category=UserWarning
    )


def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


@functools.cache
def _import() -> tuple[Any, str | None]:
    """bitsandbytes and None, or None and why it cannot be used."""
    _quiet_logs()
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None, "bitsandbytes is not installed"
    except Exception as e:  # a broken install raises anything from its native-library loader
        return None, f"bitsandbytes does not load ({type(e).__name__}: {e})"
    version = getattr(bnb, "__version__", "0")
    if _version_tuple(version) < _version_tuple(MIN_VERSION):
        return None, f"bitsandbytes {version} is too old (it needs {MIN_VERSION} or newer)"
    return bnb, None


def _try_layers(bnb: Any, device: torch.device) -> None:
    x = torch.randn(2, 64, device=device, requires_grad=True)
    for layer in (
        bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4"),
        bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False),
    ):
        layer.to(device)(x).sum().backward()


def _try_optimizers(bnb: Any, device: torch.device) -> None:
    # 4096 values: bitsandbytes keeps smaller tensors' state in 32 bits, so this takes the 8-bit path.
    for bits in (8, 32):
        p = torch.nn.Parameter(torch.zeros(4096, device=device))
        p.grad = torch.ones_like(p)
        bnb.optim.AdamW([p], lr=1e-3, optim_bits=bits).step()


@functools.cache
def problem(feature: str, device_type: str) -> str | None:
    """Why ``feature`` ("layers" or "optimizers") cannot run on ``device_type``, or None when it can."""
    bnb, why = _import()
    if bnb is None:
        return why
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (_try_layers if feature == "layers" else _try_optimizers)(bnb, torch.device(device_type))
    except Exception as e:  # the backend's own refusal: no kernel for this device, a missing library
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"bitsandbytes {bnb.__version__} has no {device_type} support here ({first})"
    return None


def same_numbers_in_eval(model: torch.nn.Module) -> None:
    """Keep a 4-bit model's CPU forward pass the same in evaluation and sampling as in training.

    Outside training, bitsandbytes' CPU backend repacks each 4-bit weight for a bf16 kernel when the
    CPU has AVX512-BF16: other numbers than the fp32 compute of the training steps, weights changed in
    place mid-run, and a refusal of layers whose input size is not a multiple of its 64-value blocks
    (builtin:tiny's MLP has 352). Turned off, every pass dequantises to fp32 as training does.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010  (a plain attribute, not a tensor)


def require(what: str, feature: str, device: torch.device, otherwise: str) -> Any:
    """bitsandbytes, when ``feature`` runs on ``device``; else a ConfigError naming ``what`` and the fix:
    the install command when bitsandbytes is missing or too old, ``otherwise`` when it lacks the device."""
    why = problem(feature, device.type)
    if why is None:
        return _import()[0]
    fix = INSTALL if _import()[0] is None else otherwise
    raise ConfigError(f"{what} needs bitsandbytes on the {device.type}: {why}", fix)
