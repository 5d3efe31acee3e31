"""Liger's fused Triton kernels on one model instance, leaving every other model in the process as it was.

Liger's per-model functions swap the forward of the instance (fused linear cross-entropy, which
never builds the full logits) and its norm and MLP modules, but they also rebind names of the
transformers modeling module: the norm and MLP classes (for models built later) and
``apply_rotary_pos_emb``, which every model of that type looks up at call time. Those names are
put back, so a benchmark's baseline or the next run in the window is not changed behind its
owner's back. RoPE instead goes through a :class:`RopeSwitch` bound to that name: Liger's kernel
inside :func:`fused_rope` (the trainer's forward passes of a Liger model), transformers' own
everywhere else. Both compute the same rotation, so a call outside the switch is only slower.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

ROPE = "apply_rotary_pos_emb"


@dataclass(frozen=True)
class Applied:
    kernels: bool = False  # the instance runs Liger's forward, norm and MLP
    rope: bool = False  # its modeling module's RoPE switches to Liger's kernel inside fused_rope()


class RopeSwitch:
    """Stands for ``apply_rotary_pos_emb`` in a modeling module: Liger's kernel while ``fused_on``."""

    fused_on = False

    def __init__(self, plain: Any, fused: Any) -> None:
        self.plain, self.fused = plain, fused

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        # Liger's signature differs past the fourth argument (position_ids before unsqueeze_dim), so
        # only the plain four-argument call, the one the attention modules make, is handed over.
        if RopeSwitch.fused_on and not args and not kwargs:
            return self.fused(q, k, cos, sin)
        return self.plain(q, k, cos, sin, *args, **kwargs)


@contextlib.contextmanager
def fused_rope(on: bool) -> Iterator[None]:
    """Liger's RoPE for the forward passes inside, when ``on`` (the model was loaded with it)."""
    if not on:
        yield
        return
    before, RopeSwitch.fused_on = RopeSwitch.fused_on, True
    try:
        yield
    finally:
        RopeSwitch.fused_on = before


def apply(model: torch.nn.Module, device: torch.device) -> Applied:
    """Swap in Liger's kernels on this instance where Liger is installed, on CUDA, for a model type
    it knows; anything else leaves the model as it was (the plain kernels are correct too)."""
    if device.type != "cuda":
        return Applied()
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        return Applied()
    module = sys.modules.get(type(model).__module__)
    if module is None:
        return Applied()
    saved = dict(vars(module))
    try:
        # cross_entropy=False: for some model types Liger's plain cross-entropy patch replaces
        # torch.nn.functional.cross_entropy process-wide; the fused linear one is per instance.
        _apply_liger_kernel_to_instance(
            model=model, rope=True, cross_entropy=False, fused_linear_cross_entropy=True
        )
    except Exception:  # an architecture Liger does not know
        return Applied()
    finally:
        fused = vars(module).get(ROPE)
        for name, value in saved.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)
    # Liger binds its forward on the instance; an unknown model type is left as it was.
    kernels = "forward" in vars(model)
    plain = saved.get(ROPE)
    if isinstance(plain, RopeSwitch):  # a second Liger model of the same type in this process
        switch: RopeSwitch = plain
        switch.fused = fused if fused is not switch else switch.fused
        return Applied(kernels, kernels)
    if not kernels or plain is None or fused is None or fused is plain:
        return Applied(kernels, False)
    setattr(module, ROPE, RopeSwitch(plain, fused))
    return Applied(kernels, True)
