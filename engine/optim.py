"""Optimizers by HF ``optim`` name, and hot-swapping one for another mid-run.

Parameter groups follow HF Trainer: biases and norm weights (1-D tensors) get no weight decay.
A swap builds the new optimizer over the same parameters; between Adam-family optimizers with
fp32 moments the first and second moments and the step count are carried over, so the swap does
not restart Adam's bias correction and the loss curve carries on.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from tunedeck.engine.config import OPTIM_NAMES, TrainConfig
from tunedeck.engine.errors import ConfigError

BNB_OPTIMS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
# Optimizers whose per-parameter state is (step, first moment, second moment) in fp32.
ADAM_FP32 = ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit")


def actual_name(name: str, device: torch.device) -> str:
    """The optimizer actually built for ``name``: AdamW's fused kernel on CUDA (HF's own default for
    ``adamw_torch`` there is the same algorithm, foreach, in more kernels)."""
    return "adamw_torch_fused" if name == "adamw_torch" and device.type == "cuda" else name


def param_groups(
    params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float
) -> list[dict[str, Any]]:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    # "decays" is our own key (torch keeps extra keys in a group) so live changes know which group decays.
    groups = [{"params": decay, "weight_decay": weight_decay, "decays": True}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "decays": False})
    return groups


def set_weight_decay(opt: torch.optim.Optimizer, weight_decay: float) -> None:
    for g in opt.param_groups:
        g["weight_decay"] = weight_decay if g.get("decays", True) else 0.0


def _need_bnb(name: str) -> Any:
    if not torch.cuda.is_available():
        raise ConfigError(
            f"train.optim={name} needs a CUDA GPU (bitsandbytes)", "use adamw_torch on this machine"
        )
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(
            f"train.optim={name} needs bitsandbytes, which is not installed",
            "pip install 'tunedeck[gpu]' or use adamw_torch",
        ) from None
    return bnb


def check_available(name: str) -> None:
    """Raise a ConfigError now, before any work, if ``name`` cannot run on this machine."""
    if name not in OPTIM_NAMES:
        raise ConfigError(
            f"train.optim={name!r} is not a known optimizer", f"allowed: {', '.join(OPTIM_NAMES)}"
        )
    if name in BNB_OPTIMS:
        _need_bnb(name)
    if name == "adamw_torch_fused" and not _fused_ok():
        raise ConfigError(
            "train.optim=adamw_torch_fused needs CUDA (or a torch with fused CPU AdamW)", "use adamw_torch"
        )


def _fused_ok() -> bool:
    # torch >= 2.4 has a fused AdamW for CPU too; it must be constructible here.
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.cuda.is_available()
    return True


def build(name: str, groups: list[dict[str, Any]], train: TrainConfig, lr: float) -> torch.optim.Optimizer:
    check_available(name)
    betas = (train.adam_beta1, train.adam_beta2)
    if name == "adamw_torch":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=train.adam_epsilon)
    if name == "adamw_torch_fused":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=train.adam_epsilon, fused=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # HF Trainer's settings: an external LR schedule, so no relative step or parameter scaling.
        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False)
    bnb = _need_bnb(name)
    kw = {"lr": lr, "betas": betas, "eps": train.adam_epsilon}
    if name == "adamw_8bit":
        return bnb.optim.AdamW(groups, optim_bits=8, **kw)
    if name == "paged_adamw_8bit":
        return bnb.optim.AdamW(groups, optim_bits=8, is_paged=True, **kw)
    if name == "paged_adamw_32bit":
        return bnb.optim.AdamW(groups, optim_bits=32, is_paged=True, **kw)
    raise ConfigError(f"train.optim={name!r} is not a known optimizer", f"allowed: {', '.join(OPTIM_NAMES)}")


def _moments(state: dict[str, Any]) -> tuple[float, torch.Tensor, torch.Tensor] | None:
    if not state:
        return None
    if "exp_avg" in state:
        return float(state["step"]), state["exp_avg"], state["exp_avg_sq"]
    if "state1" in state and "state2" in state and state["state1"].dtype == torch.float32:
        return float(state["step"]), state["state1"], state["state2"]
    return None


def swap(
    old: torch.optim.Optimizer, old_name: str, new_name: str, train: TrainConfig, weight_decay: float
) -> tuple[torch.optim.Optimizer, bool]:
    """Build ``new_name`` over ``old``'s parameters; return it and whether Adam moments were carried."""
    groups = [
        {
            "params": list(g["params"]),
            "decays": g.get("decays", True),
            "weight_decay": weight_decay if g.get("decays", True) else 0.0,
        }
        for g in old.param_groups
    ]
    lr = old.param_groups[0]["lr"]
    new = build(new_name, groups, train, lr)
    if old_name not in ADAM_FP32 or new_name not in ADAM_FP32:
        return new, False
    carried = False
    for group in old.param_groups:
        for p in group["params"]:
            m = _moments(old.state.get(p, {}))
            if m is None:
                continue
            step, m1, m2 = m
            if new_name.startswith("adamw_torch"):
                # Same layout as torch initialises it, so the fused kernel accepts it.
                fused = new_name == "adamw_torch_fused"
                new.state[p] = {
                    "step": torch.tensor(step, dtype=torch.float32, device=p.device if fused else "cpu"),
                    "exp_avg": m1.detach().clone().to(p.device),
                    "exp_avg_sq": m2.detach().clone().to(p.device),
                }
            else:  # bitsandbytes 32-bit: its own names for the two moments
                new.state[p] = {
                    "step": int(step),
                    "state1": m1.detach().clone().float(),
                    "state2": m2.detach().clone().float(),
                }
            carried = True
    return new, carried
