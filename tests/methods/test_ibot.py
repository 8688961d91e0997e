"""iBOT: masks, what student and teacher see, both losses and centres against separate
computations, heads, frozen last layers, no drop path in the teacher, a run through the engine."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from selfsup.engine.run import PretrainRun
from selfsup.losses import dino_center_update, dino_loss, ibot_patch_loss
from selfsup.methods.base import Batch, Method, StepInfo
from selfsup.methods.ibot import IBOT, sample_ibot_masks
from selfsup.nn.backbones.vit import DropPath, VisionTransformer
from selfsup.registry import BACKBONES, METHODS, VIEW_RECIPES
from tests.conftest import tiny_config

HEAD = {"proj_hidden_dim": 32, "proj_dim": 16, "out_dim": 32, "patch_out_dim": 24}


def vit(depth: int = 2, **kwargs: Any) -> VisionTransformer:
    options: dict[str, Any] = dict(in_channels=1, image_size=16, patch_size=4, embed_dim=32, depth=depth, num_heads=2)
    options.update(kwargs)
    return BACKBONES.build("vit_tiny", **options)


def small_ibot(name: str = "ibot", backbone: torch.nn.Module | None = None, **kwargs: Any) -> IBOT:
    options = {**HEAD, "drop_path_rate": None, **kwargs}
    return METHODS.build(name, backbone=backbone if backbone is not None else vit(), **options)


def views(batch_size: int = 8, num_local: int = 2, seed: int = 0) -> list[Tensor]:
    recipe = VIEW_RECIPES.build(
        "multi_crop", image_size=16, in_channels=1, mean=(0.5,), std=(0.25,), num_local=num_local, local_size=8
    )
    return recipe(torch.rand(batch_size, 1, 16, 16, generator=torch.Generator().manual_seed(seed)))


def info(method: Method, step: int = 0, epoch: float = 0.0) -> StepInfo:
    return StepInfo(step=step, total_steps=100, epoch=epoch, lr=0.1).with_schedules(method.schedules())


def fixed_mask(n: int, seed: int = 3) -> Tensor:
    mask = torch.rand(n, 16, generator=torch.Generator().manual_seed(seed)) < 0.3
    mask[: n // 2] = False  # half of the image-views unmasked, as the paper's probability 0.5
    return mask


def test_masks_half_of_the_views_blockwise_with_ratios_in_the_papers_range() -> None:
    torch.manual_seed(0)
    masks = sample_ibot_masks(200, 7, 7, mask_ratio=(0.1, 0.5), mask_probability=0.5)
    assert masks.shape == (200, 49) and masks.dtype == torch.bool
    counts = masks.sum(dim=1)
    assert int((counts > 0).sum()) == 100  # exactly the fraction 0.5 masked
    fractions = counts[counts > 0].float() / 49
    assert fractions.max() <= 0.5 + 1e-6 and fractions.min() >= 0.04  # round(0.1 * 49) = 5, minus block shortfall
    assert 0.2 < float(fractions.mean()) < 0.35  # ratios ~ U(0.1, 0.5), mean 0.3
    torch.manual_seed(0)
    assert torch.equal(sample_ibot_masks(200, 7, 7), masks)  # the seeded global generator decides


def test_student_sees_masked_globals_teacher_unmasked_and_both_losses_follow_the_formulas(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    method = small_ibot(shared_head=False)
    vs = views()
    n = 16
    mask = fixed_mask(n)
    monkeypatch.setattr(method, "sample_masks", lambda num, gh, gw, device: mask)
    with torch.no_grad():  # non-zero centres, so that centring matters
        method.center.normal_()
        method.patch_center.normal_()
    step = info(method, epoch=15.0)  # mid warm-up: both teacher temperatures 0.055
    out = method.training_step(Batch(views=vs, index=torch.arange(8)), step)

    global_crops = torch.cat(vs[:2])
    with torch.no_grad():
        s_tokens = method.backbone.forward_tokens(global_crops, mask=mask)
        s_local = method.backbone.forward_tokens(torch.cat(vs[2:]))[:, 0]
        student_cls = method.head(torch.cat([s_tokens[:, 0], s_local])).chunk(4)
        assert method.patch_head is not None and method.teacher_patch_head is not None
        student_patch = method.patch_head(s_tokens[:, 1:][mask])
        t_tokens = method.teacher_backbone.forward_tokens(global_crops)
        teacher_cls = method.teacher_head(t_tokens[:, 0])
        teacher_patch = method.teacher_patch_head(t_tokens[:, 1:])  # (N, L, K) at every patch
    assert step["teacher_temp"] == pytest.approx(0.055) and step["teacher_patch_temp"] == pytest.approx(0.055)
    cls = dino_loss(student_cls, teacher_cls.chunk(2), method.center, student_temp=0.1, teacher_temp=0.055)
    patch = ibot_patch_loss(student_patch, teacher_patch[mask], mask, method.patch_center, 0.1, 0.055)
    torch.testing.assert_close(out["cls_loss"], cls)
    torch.testing.assert_close(out["patch_loss"], patch)
    torch.testing.assert_close(out["loss"].detach(), cls + patch)  # lambda_1 = lambda_2 = 1

    # The centres move only in on_step_end: EMA of the class outputs and of each image's mean
    # patch output (iBOT's center2: every patch, not only masked ones).
    before, patch_before = method.center.clone(), method.patch_center.clone()
    assert torch.equal(method.center, before)
    method.on_step_end(step, {k: v.detach() for k, v in out.items()})
    torch.testing.assert_close(method.center, dino_center_update(before, teacher_cls, 0.9))
    torch.testing.assert_close(method.patch_center, 0.9 * patch_before + 0.1 * teacher_patch.mean(dim=(0, 1)))


def test_shared_head_serves_both_token_kinds_and_separate_heads_have_their_own_pairs() -> None:
    shared = small_ibot()
    assert shared.patch_head is None and len(shared.ema_pairs()) == 2
    assert shared.heads()[0] is shared.heads()[1] is shared.head
    assert shared.patch_center.shape == (1, HEAD["out_dim"])
    separate = small_ibot(shared_head=False)
    assert separate.patch_head is not None and len(separate.ema_pairs()) == 3
    assert separate.patch_center.shape == (1, HEAD["patch_out_dim"])
    # After the frozen first epoch, when the last layers get gradients too.
    out = separate.training_step(Batch(views=views(), index=torch.arange(8)), info(separate, epoch=1.0))
    assert out["teacher_patch_logits"].shape == (16, HEAD["patch_out_dim"])
    out["loss"].backward()
    assert all(p.grad is not None for p in separate.patch_head.parameters() if p.requires_grad)


def test_last_layers_of_both_heads_frozen_during_the_first_epoch_only() -> None:
    method = small_ibot(shared_head=False, norm_last_layer=False)
    assert method.patch_head is not None
    batch = Batch(views=views(), index=torch.arange(8))
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=0.01, weight_decay=0.1)
    last = method.head.last_layer_parameters() + method.patch_head.last_layer_parameters()
    for epoch in (0.0, 0.9, 1.0):
        before = [p.detach().clone() for p in last]
        method.training_step(batch, info(method, epoch=epoch))["loss"].backward()
        method.on_after_backward(info(method, epoch=epoch))
        opt.step()
        opt.zero_grad()
        assert [torch.equal(p, b) for p, b in zip(last, before)] == [epoch < 1.0] * 4


def test_drop_path_in_the_student_only() -> None:
    method = small_ibot(backbone=vit(depth=3), drop_path_rate=0.4)
    rates = [m.p for m in method.backbone.modules() if isinstance(m, DropPath)]
    assert rates == pytest.approx([0.0, 0.2, 0.4])
    assert all(m.p == 0.0 for m in method.teacher_backbone.modules() if isinstance(m, DropPath))
    method.train()  # the engine trains the whole method, teacher included
    assert method.teacher_backbone.training
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(method.teacher_backbone(x), method.teacher_backbone(x))
        assert not torch.equal(method.backbone(x), method.backbone(x))
    with pytest.raises(ValueError, match="drop_path_rate=null"):
        METHODS.build("ibot", backbone=_NoDropPathViT(), **HEAD)


class _NoDropPathViT(torch.nn.Module):
    """A token backbone without ``set_drop_path_rate`` (e.g. a wrapped third-party ViT)."""

    patch_size, grid_size, num_patches, embed_dim, num_features = 4, (4, 4), 16, 32, 32

    def forward_tokens(self, x: Tensor, keep_indices: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        raise NotImplementedError


@pytest.mark.parametrize(
    "options",
    [{"mask_ratio": (0.5, 0.1)}, {"mask_probability": 1.5}, {"centering": "mean"}, {"layer_decay": 0.0}],
)
def test_bad_options_are_rejected(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        small_ibot(**options)


def test_needs_a_vit() -> None:
    with pytest.raises(TypeError, match="Vision Transformer"):
        METHODS.build("ibot", backbone=BACKBONES.build("convnet", in_channels=1, image_size=16, width=8), **HEAD)


def test_the_trainer_drives_ibot(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        "ibot",
        "train.max_steps=3",
        "data.image_size=16",
        "views.num_local=2",
        "views.local_size=8",
        *(f"method.{k}={v}" for k, v in HEAD.items()),
        "method.shared_head=false",
    )
    cfg.backbone = {"name": "vit_tiny", "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2}
    trainer = PretrainRun(cfg)
    trainer.fit()
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [0, 1, 2]
    assert all(math.isfinite(r["loss"]) and r["patch_loss"] > 0 for r in steps)
    method = trainer.method
    assert isinstance(method, IBOT)
    assert method.center.abs().sum() > 0 and method.patch_center.abs().sum() > 0
