"""Parameter groups that methods hand to the engine's optimiser.

Each group is a dict in ``torch.optim`` form plus the keys the engine reads: ``name``,
``lr_scale`` / ``wd_scale`` (multipliers of the scheduled lr and weight decay),
``fixed_lr_value`` (a constant lr) and ``lars_exclude`` (no LARS adaptation).
"""

from __future__ import annotations

from typing import Any

from torch import nn


def layer_decay_param_groups(
    encoder: nn.Module,
    head: nn.Module,
    layer_decay: float = 1.0,
    encoder_prefix: str = "encoder.",
    head_prefix: str = "head.",
) -> list[dict[str, Any]]:
    """Parameter groups for fine-tuning with layer-wise lr decay (no decay on norms/biases).

    For an encoder with a ``blocks`` list of depth ``n`` (a ViT), layer ids are: 0 for the
    patch embedding, class/mask/register tokens and position embeddings, ``i + 1`` for block ``i``,
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
    embeddings = ("patch_embed", "cls_token", "pos_embed", "mask_token", "register_tokens")

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
            groups[key] = {
                "params": [],
                "param_names": [],
                "name": key,
                "layer_id": lid,
                "lr_scale": layer_decay ** (last - lid),
            }
            if no_decay:
                groups[key]["weight_decay"] = 0.0
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return sorted(groups.values(), key=lambda g: (g["layer_id"], g["name"]))
