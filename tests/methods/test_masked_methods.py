"""MoCo v3, MAE, SimMIM and end-to-end fine-tuning: paper formulas, masking, frozen parts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from selfsup.config import Config, apply_overrides, from_dict
from selfsup.data.base import TensorImageDataset
from selfsup.engine.build import build_components
from selfsup.engine.finetune import finetune, finetune_encoder
from selfsup.engine.run import PretrainRun
from selfsup.methods.base import Batch, StepInfo
from selfsup.methods.mae import MAE
from selfsup.methods.moco_v3 import MoCoV3
from selfsup.methods.simmim import SimMIM
from selfsup.nn.param_groups import layer_decay_param_groups
from selfsup.nn.patches import patchify
from selfsup.registry import BACKBONES, VIEW_RECIPES
from tests.conftest import tiny_config

INFO = StepInfo(step=0, total_steps=10, epoch=0.0, lr=0.1, ema_momentum=0.9)
# A 16 px ViT with 4 px patches: L = 16 patches.
VIT = dict(in_channels=1, image_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
# Engine overrides for a 2-step digits run (8 px) with a 2 px-patch ViT.
VIT_RUN = [
    "backbone.name=vit_tiny",
    "backbone.patch_size=2",
    "backbone.embed_dim=16",
    "backbone.depth=1",
    "backbone.num_heads=2",
    "train.max_steps=2",
    "data.limit=256",
    "train.batch_size=32",
]


def vit_config(tmp_path: Path, method: str, *overrides: str) -> Config:
    """``tiny_config`` with the tiny ViT in place of its ConvNet (whose ``width`` a ViT lacks)."""
    tree = tiny_config(tmp_path, method).to_dict()
    tree["backbone"] = {"name": "vit_tiny"}
    return from_dict(apply_overrides(tree, [*VIT_RUN, *overrides]))


def vit(**kw: int) -> torch.nn.Module:
    return BACKBONES.build("vit_tiny", **{**VIT, **kw})


def mae(**kw: object) -> MAE:
    return MAE(vit(), in_channels=1, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, **kw)


def batch_of(images: Tensor) -> Batch:
    return Batch(views=[images], index=torch.arange(images.shape[0]))


# ----------------------------------------------------------------------------------- MAE


def test_mae_loss_is_norm_pix_mse_over_masked_patches_only() -> None:
    method = mae()
    x = torch.randn(4, 1, 16, 16)
    torch.manual_seed(1)
    loss = method.training_step(batch_of(x), INFO)["loss"].detach()
    torch.manual_seed(1)  # the same mask and the same (deterministic) prediction again
    mask = method.sample_mask(4, x.device)
    pred = method.predict(x, mask).detach().double()

    target = patchify(x, 4).double()
    mean = target.mean(-1, keepdim=True)
    var = ((target - mean) ** 2).sum(-1, keepdim=True) / (target.shape[-1] - 1)
    target = (target - mean) / (var + 1e-6).sqrt()
    total, count = 0.0, 0
    for b in range(4):
        for i in range(16):
            if mask[b, i]:
                total += float(((pred[b, i] - target[b, i]) ** 2).mean())
                count += 1
    assert count == 4 * 12
    assert float(loss) == pytest.approx(total / count, rel=1e-5)

    # Predictions on visible patches do not enter the loss: their gradient is exactly zero.
    from selfsup.losses import masked_mse

    p = pred.float().requires_grad_(True)
    masked_mse(p, patchify(x, 4), mask, norm_pix=True).backward()
    assert p.grad is not None
    assert torch.all(p.grad[~mask] == 0) and torch.all(p.grad[mask].abs().sum(-1) > 0)


def test_mae_mask_ratio_is_exact_and_reproducible() -> None:
    method = mae()
    torch.manual_seed(3)
    first = method.sample_mask(6, torch.device("cpu"))
    torch.manual_seed(3)
    again = method.sample_mask(6, torch.device("cpu"))
    other = method.sample_mask(6, torch.device("cpu"))
    assert first.dtype == torch.bool and first.shape == (6, 16)
    assert torch.all(first.sum(1) == 12)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_mae_encoder_sees_only_visible_tokens() -> None:
    method = mae()
    seen: list[int] = []
    method.backbone.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    method.training_step(batch_of(torch.randn(2, 1, 16, 16)), INFO)
    assert seen == [1 + 16 // 4]  # class token + 25% of 16 patches
    seen.clear()
    assert method.embed(torch.randn(2, 1, 16, 16)).shape == (2, 32)
    assert seen == [1 + 16]  # evaluation features come from the full, unmasked image


def test_masked_methods_require_a_vit() -> None:
    convnet = BACKBONES.build("convnet", in_channels=1, image_size=16, width=8)
    with pytest.raises(TypeError, match="Vision Transformer"):
        MAE(convnet, in_channels=1)
    with pytest.raises(TypeError, match="Vision Transformer"):
        SimMIM(convnet, in_channels=1)


def test_mae_reconstruct_keeps_visible_patches_and_blanks_masked_ones() -> None:
    method = mae(norm_pix_loss=False).eval()
    x = torch.randn(3, 1, 16, 16)
    mask = method.sample_mask(3, x.device)
    masked, recon = method.reconstruct(x, mask)
    assert masked.shape == recon.shape == x.shape
    px, pm, pr = patchify(x, 4), patchify(masked, 4), patchify(recon, 4)
    assert torch.equal(pm[~mask], px[~mask]) and torch.all(pm[mask] == 0)
    assert torch.equal(pr[~mask], px[~mask])
    assert torch.allclose(pr[mask], method.predict(x, mask)[mask])


# -------------------------------------------------------------------------------- SimMIM


def test_simmim_l1_over_masked_patches_and_mask_token_gets_gradient() -> None:
    method = SimMIM(vit(), in_channels=1)
    assert method.backbone.mask_token is not None
    x = torch.randn(4, 1, 16, 16)
    torch.manual_seed(2)
    loss = method.training_step(batch_of(x), INFO)["loss"]
    loss.backward()
    assert method.backbone.mask_token.grad is not None and method.backbone.mask_token.grad.abs().sum() > 0
    torch.manual_seed(2)
    mask = method.sample_mask(4, x.device)
    assert torch.all(mask.sum(1) == round(0.6 * 16))
    pred = method.predict(x, mask).detach().double()
    target = patchify(x, 4).double()
    expected = (pred - target).abs()[mask].sum() / (mask.sum() * target.shape[-1])
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    # The encoder input really carries the mask token: masked positions change the output.
    with torch.no_grad():
        assert not torch.allclose(method.backbone.forward_tokens(x, mask=mask), method.backbone.forward_tokens(x))


def test_simmim_masks_whole_mask_patches() -> None:
    method = SimMIM(vit(patch_size=2), in_channels=1, mask_patch_size=4)  # 8x8 grid, 2x2 units
    mask = method.sample_mask(5, torch.device("cpu")).reshape(5, 8, 8)
    units = mask.reshape(5, 4, 2, 4, 2)
    assert torch.all(units.all(dim=(2, 4)) == units.any(dim=(2, 4)))  # each 2x2 unit all or nothing
    assert torch.all(mask.sum((1, 2)) == 4 * round(0.6 * 16))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        SimMIM(vit(patch_size=2), in_channels=1, mask_patch_size=3)


# ------------------------------------------------------------------------------- MoCo v3


def test_moco_v3_frozen_patch_projection_through_the_trainer(tmp_path: Path) -> None:
    cfg = vit_config(
        tmp_path, "moco_v3", "method.proj_hidden_dim=32", "method.proj_dim=16", "method.pred_hidden_dim=32"
    )
    trainer = PretrainRun(cfg)
    method = trainer.method
    assert isinstance(method, MoCoV3)
    frozen = {n: p.detach().clone() for n, p in method.backbone.patch_embed.named_parameters()}
    block_before = method.backbone.blocks[0].mlp.fc1.weight.detach().clone()
    trained = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in trained for p in method.backbone.patch_embed.parameters())
    trainer.fit()
    for name, p in method.backbone.patch_embed.named_parameters():
        assert not p.requires_grad and p.grad is None
        assert torch.equal(p, frozen[name])
        # The teacher's copy is averaged with an identical student: unchanged up to the EMA's
        # float rounding (m * t + (1 - m) * t need not be bit-exact t).
        teacher = dict(method.teacher_backbone.patch_embed.named_parameters())[name]
        assert torch.allclose(teacher, frozen[name], rtol=0, atol=1e-6)
    assert not torch.equal(method.backbone.blocks[0].mlp.fc1.weight, block_before)  # the rest trained


@pytest.mark.parametrize("freeze", [True, False])
def test_moco_v3_patch_projection_gradient_follows_the_option(freeze: bool) -> None:
    method = MoCoV3(vit(), proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, freeze_patch_embed=freeze)
    views = VIEW_RECIPES.build("two_views", image_size=16, in_channels=1, mean=(0.5,), std=(0.25,))(
        torch.rand(8, 1, 16, 16)
    )
    method.training_step(Batch(views=views, index=torch.arange(8)), INFO)["loss"].backward()
    weight = method.backbone.patch_embed.proj.weight
    if freeze:
        assert not weight.requires_grad and weight.grad is None
    else:
        assert weight.requires_grad and weight.grad is not None and weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- fine-tuning


def _halves(n: int, seed: int) -> TensorImageDataset:
    """Class 0: bright top half; class 1: bright bottom half (flips keep the class)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.rand(n, 1, 16, 16, generator=g) * 80
    images[labels == 0, :, :8] += 150
    images[labels == 1, :, 8:] += 150
    return TensorImageDataset(images.to(torch.uint8), labels)


def test_finetune_learns_a_separable_set_and_leaves_the_encoder_alone() -> None:
    encoder = vit(embed_dim=16)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    kw = dict(image_size=16, in_channels=1, mean=(0.5,), std=(0.25,))
    metrics = finetune(
        encoder,
        16,
        _halves(128, 0),
        _halves(64, 1),
        2,
        train_views=VIEW_RECIPES.build("single_view", crop_scale=(0.8, 1.0), **kw),
        eval_views=VIEW_RECIPES.build("eval", **kw),
        epochs=4,
        batch_size=32,
        lr=3e-3,
        layer_decay=0.75,
        warmup_epochs=0.5,
    )
    assert metrics["finetune_top1"] >= 0.9, metrics
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())


def test_layer_decay_scales_are_monotone_over_depth() -> None:
    encoder = vit(depth=3)
    head = torch.nn.Linear(32, 10)
    groups = layer_decay_param_groups(encoder, head, layer_decay=0.5)
    scale_of = {name: g["lr_scale"] for g in groups for name in g["param_names"]}
    assert scale_of["encoder.patch_embed.proj.weight"] == 0.5**4
    assert scale_of["encoder.cls_token"] == 0.5**4
    assert [scale_of[f"encoder.blocks.{i}.attn.qkv.weight"] for i in range(3)] == [0.5**3, 0.5**2, 0.5]
    assert scale_of["encoder.norm.weight"] == scale_of["head.weight"] == 1.0
    by_layer = sorted({(g["layer_id"], g["lr_scale"]) for g in groups})
    assert all(a[1] < b[1] for a, b in zip(by_layer, by_layer[1:]))
    n_params = sum(1 for _ in encoder.parameters()) + sum(1 for _ in head.parameters())
    assert len(scale_of) == n_params  # every parameter in exactly one group
    no_decay = {n for g in groups if g.get("weight_decay") == 0.0 for n in g["param_names"]}
    assert "encoder.cls_token" in no_decay and "head.bias" in no_decay and "head.weight" not in no_decay


def test_from_scratch_builds_a_fresh_encoder_of_the_same_architecture(tmp_path: Path) -> None:
    cfg = vit_config(
        tmp_path, "mae", "method.decoder_embed_dim=16", "method.decoder_depth=1", "method.decoder_num_heads=2"
    )
    parts = build_components(cfg, torch.device("cpu"))
    pretrained = parts.method.backbone
    with torch.no_grad():
        for p in pretrained.parameters():
            p.add_(1.0)  # stands for pretraining
    assert finetune_encoder(parts.method, cfg, parts.splits) is pretrained
    fresh = finetune_encoder(parts.method, cfg, parts.splits, from_scratch=True)
    again = finetune_encoder(parts.method, cfg, parts.splits, from_scratch=True)
    assert fresh is not pretrained and type(fresh) is type(pretrained)
    pre, new = pretrained.state_dict(), fresh.state_dict()
    assert pre.keys() == new.keys() and all(pre[k].shape == new[k].shape for k in pre)
    assert not torch.equal(pre["blocks.0.attn.qkv.weight"], new["blocks.0.attn.qkv.weight"])
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in new.items())  # seeded


def test_mae_run_reconstruction_png_and_finetune_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from selfsup.cli import main
    from selfsup.visualize import reconstruction_grid

    cfg = vit_config(
        tmp_path, "mae", "method.decoder_embed_dim=16", "method.decoder_depth=1", "method.decoder_num_heads=2"
    )
    trainer = PretrainRun(cfg)
    trainer.fit()
    png = reconstruction_grid(trainer.run_dir, [0, 1], tmp_path / "fig" / "recon.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    out_of_range = ["visualize", "reconstruction", str(trainer.run_dir), "--images", "0", "99999"]
    assert main([*out_of_range, "--out", str(tmp_path / "fig2.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--images 99999" in err and "indices 0 to" in err, err

    capsys.readouterr()
    args = ["eval", "finetune", str(trainer.run_dir), "eval.finetune_epochs=1", "eval.finetune_batch_size=64", "--json"]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ((name, metrics),) = rows.items()
    assert "pretrained" in name and 0.0 <= metrics["finetune_top1"] <= 1.0
    assert main([*args, "--from-scratch"]) == 0
    ((name, _),) = json.loads(capsys.readouterr().out.strip().splitlines()[-1]).items()
    assert "random init" in name
    overrides = args[:-1]  # the dotted overrides come before --json
    assert main([*overrides, "eval.finetune_label_fraction=0.5", "--json"]) == 0
    ((name, _),) = json.loads(capsys.readouterr().out.strip().splitlines()[-1]).items()
    assert "labels" in name
    assert main([*overrides, "eval.finetune_label_fraction=0"]) == 2
    assert "finetune_label_fraction" in capsys.readouterr().err
