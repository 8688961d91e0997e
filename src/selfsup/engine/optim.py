"""Optimisers: SGD, AdamW and LARS over a method's parameter groups."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from selfsup.config import OptimConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (trust ratio).

    For each parameter ``w`` with gradient ``g`` (weight decay folded in), the update uses
    ``eta * ||w|| / ||g + wd * w||`` as a per-layer rate multiplier. Groups flagged
    ``lars_exclude`` (biases, norms) get plain SGD with momentum, as in SimCLR and BYOL.

    References: You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks",
    2017 (arXiv:1708.03888).
    """

    def __init__(
        self, params: Iterable[Any], lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad: Tensor = p.grad
                if group["weight_decay"] != 0:
                    grad = grad.add(p, alpha=group["weight_decay"])
                if not group["lars_exclude"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(grad)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm)
                    )
                    grad = grad.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def build_optimizer(param_groups: list[dict[str, Any]], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """Builds the configured optimiser. Groups may carry ``weight_decay`` (overriding the
    config's, e.g. 0 for norms), ``lr_scale`` (a multiplier on the scheduled lr, e.g. layer
    decay), ``fixed_lr`` (``True``: the group keeps the peak lr times ``lr_scale`` on every
    step, without warm-up or decay, e.g. SimSiam's predictor) and ``lars_exclude``.

    SGD and AdamW over CUDA parameters use PyTorch's fused kernels: a few launches per step,
    and a ``found_inf`` input with which the training loop skips a non-finite step on the
    device, without a host sync."""
    groups = []
    for group in param_groups:
        if not group["params"]:
            continue
        group = dict(group)
        group.setdefault("lr_scale", 1.0)
        if group.pop("fixed_lr", False):
            group["fixed_lr_value"] = lr * group["lr_scale"]
        group.setdefault("wd_scale", 0.0 if group.get("weight_decay") == 0.0 else 1.0)
        group["weight_decay"] = cfg.weight_decay * group["wd_scale"]
        if cfg.name != "lars":
            group.pop("lars_exclude", None)
        groups.append(group)
    on_gpu = bool(groups) and all(p.is_cuda for group in groups for p in group["params"])
    fused = True if on_gpu else None
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, eta=cfg.lars_eta)
    raise ValueError(f"unknown optimiser {cfg.name!r}")


def set_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Applies this step's lr and weight decay to every group (respecting the groups'
    ``lr_scale`` and ``wd_scale``); groups built with ``fixed_lr`` keep their constant lr."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("fixed_lr_value", lr * group.get("lr_scale", 1.0))
        group["weight_decay"] = weight_decay * group.get("wd_scale", 1.0)
