"""Optimisers: SGD, AdamW and LARS over a method's parameter groups."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from selfsup.config import OptimConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (trust ratio).

    For each parameter ``w`` with gradient ``g`` (weight decay folded in), the update uses
    ``eta * ||w|| / ||g + wd * w||`` as a per-layer rate multiplier. Groups flagged
    ``lars_exclude`` (biases, norms) get plain SGD with momentum, as in SimCLR and BYOL.

    References: You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks",
    2017 (arXiv:1708.03888).
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, eta: float = 0.001) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                        lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
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
                    trust = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
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
    step, without warm-up or decay, e.g. SimSiam's predictor) and ``lars_exclude``."""
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
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, eta=cfg.lars_eta)
    raise ValueError(f"unknown optimiser {cfg.name!r}")


def set_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Applies this step's lr and weight decay to every group (respecting the groups'
    ``lr_scale`` and ``wd_scale``); groups built with ``fixed_lr`` keep their constant lr."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("fixed_lr_value", lr * group.get("lr_scale", 1.0))
        group["weight_decay"] = weight_decay * group.get("wd_scale", 1.0)


def layer_decay_param_groups(encoder: nn.Module, head: nn.Module, layer_decay: float = 1.0,
                             encoder_prefix: str = "encoder.", head_prefix: str = "head.") -> list[dict[str, Any]]:
    """Parameter groups for fine-tuning with layer-wise lr decay (no decay on norms/biases).

    For an encoder with a ``blocks`` list of depth ``n`` (a ViT), layer ids are: 0 for the
    patch embedding, class/mask tokens and position embeddings, ``i + 1`` for block ``i``,
    and ``n + 1`` for everything after the blocks (final norm) and the head. Each group's
    ``lr_scale`` is ``layer_decay ** (n + 1 - layer_id)``, so the head trains at the full
    rate and earlier layers ever more slowly. Encoders without ``blocks`` get scale 1
    everywhere. Groups are named ``"layer{id}_{decay|no_decay}"``; the optimiser reads
    ``lr_scale`` and ``weight_decay`` as in :func:`build_optimizer`.

    Args:
        encoder: the pretrained encoder being fine-tuned.
        head: the classifier on top of it.
        layer_decay: per-layer multiplier in ``(0, 1]`` (BEiT/MAE: 0.65-0.75 for ViT-B).
        encoder_prefix, head_prefix: prefixes added to the parameter names in the groups'
            ``param_names`` (for inspection only).

    References: Bao et al. 2021, BEiT, arXiv:2106.08254 (layer-wise lr decay); He et al.
    2021, MAE, arXiv:2111.06377 (Appendix A.3); Clark et al. 2020, ELECTRA,
    arXiv:2003.10555.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    blocks = getattr(encoder, "blocks", None)
    depth = len(blocks) if isinstance(blocks, nn.ModuleList) else 0
    last = depth + 1
    embeddings = ("patch_embed", "cls_token", "pos_embed", "mask_token")

    def layer_id(name: str) -> int:
        if depth == 0:
            return last
        if name.split(".")[0] in embeddings:
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return last

    groups: dict[str, dict[str, Any]] = {}
    named = [(encoder_prefix + n, layer_id(n), p) for n, p in encoder.named_parameters()]
    named += [(head_prefix + n, last, p) for n, p in head.named_parameters()]
    for name, lid, p in named:
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in embeddings
        key = f"layer{lid}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {"params": [], "param_names": [], "name": key, "layer_id": lid,
                           "lr_scale": layer_decay ** (last - lid)}
            if no_decay:
                groups[key]["weight_decay"] = 0.0
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return sorted(groups.values(), key=lambda g: (g["layer_id"], g["name"]))
