"""CAE: what the encoder and the regressor see, the stop-gradient target, the loss, learning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from selfsup.data.base import DataSplits
from selfsup.engine.run import PretrainRun
from selfsup.methods.base import Batch, StepInfo
from selfsup.methods.cae import CAE
from selfsup.nn.masking import mask_to_keep_indices
from selfsup.nn.patches import patchify
from selfsup.registry import BACKBONES, DATASETS, VIEW_RECIPES
from selfsup.transforms import to_float
from tests.methods.test_masked_methods import vit_config

VIT = dict(in_channels=1, image_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
INFO = StepInfo(step=0, total_steps=10, epoch=0.0)


def cae(**kw: object) -> CAE:
    backbone = BACKBONES.build("vit_tiny", **VIT)
    options: dict[str, object] = dict(
        in_channels=1, decoder_embed_dim=32, regressor_depth=2, decoder_depth=1, decoder_num_heads=2, mask_min_block=2
    )
    return CAE(backbone, **{**options, **kw})  # type: ignore[arg-type]


def batch_of(images: Tensor) -> Batch:
    return Batch(views=[images], index=torch.arange(images.shape[0]))


def test_block_mask_has_the_exact_ratio() -> None:
    mask = cae().sample_mask(7, torch.device("cpu"))
    assert mask.shape == (7, 16) and torch.all(mask.sum(1) == 8)  # the paper's 50%


def test_encoder_sees_visible_patches_with_gradient_and_masked_ones_without() -> None:
    method = cae(mask_ratio=0.75)
    seen: list[tuple[int, bool]] = []
    method.backbone.blocks[0].register_forward_hook(
        lambda m, args, out: seen.append((args[0].shape[1], torch.is_grad_enabled()))
    )
    method.training_step(batch_of(torch.randn(2, 1, 16, 16)), INFO)
    assert seen == [(1 + 4, True), (1 + 12, False)]  # class token + visible; class token + masked


def test_target_is_the_encoders_own_latents_of_the_masked_patches_without_gradient() -> None:
    method = cae()
    x = torch.randn(3, 1, 16, 16)
    mask = method.sample_mask(3, x.device)
    _, pred_latent, target = method.forward_latents(x, mask)
    assert not target.requires_grad and pred_latent.requires_grad
    with torch.no_grad():
        own = method.backbone.forward_tokens(x, keep_indices=mask_to_keep_indices(~mask))[:, 1:]
    torch.testing.assert_close(target, own)


def test_predictions_see_only_the_visible_patches() -> None:
    """Changing the pixels of masked patches changes the target latents but not the
    regressor's predictions or the decoder's output: no information leaks from the masked
    patches into the prediction path."""
    method = cae().eval()
    x = torch.randn(2, 1, 16, 16)
    mask = method.sample_mask(2, x.device)
    grid = mask.reshape(2, 1, 4, 1, 4, 1).expand(2, 1, 4, 4, 4, 4).reshape(2, 1, 16, 16)
    y = torch.where(grid, torch.randn_like(x), x)
    with torch.no_grad():
        pred_x, lat_x, tgt_x = method.forward_latents(x, mask)
        pred_y, lat_y, tgt_y = method.forward_latents(y, mask)
        torch.testing.assert_close(lat_x, lat_y)
        torch.testing.assert_close(pred_x, pred_y)
        assert not torch.allclose(tgt_x, tgt_y)
        # ... while changing the visible pixels does change the prediction.
        pred_z, _, _ = method.forward_latents(torch.where(grid, x, torch.randn_like(x)), mask)
        assert not torch.allclose(pred_x, pred_z)


@pytest.mark.parametrize("decoder_embed_dim", [32, 16])  # 16: through the encoder-to-regressor map
def test_step_loss_is_recon_plus_two_alignment_in_float64(decoder_embed_dim: int) -> None:
    method = cae(decoder_embed_dim=decoder_embed_dim)
    x = torch.randn(4, 1, 16, 16)
    torch.manual_seed(1)
    out = method.training_step(batch_of(x), INFO)
    torch.manual_seed(1)
    mask = method.sample_mask(4, x.device)
    with torch.no_grad():
        pred, lat, tgt = (t.double() for t in method.forward_latents(x, mask))
    target = patchify(x, 4).double()
    recon, count = 0.0, 0
    for b in range(4):
        masked = [i for i in range(16) if mask[b, i]]
        for m, i in enumerate(masked):  # predictions come in ascending patch order
            t = target[b, i]
            t = (t - t.mean()) / (t.var() + 1e-6).sqrt()
            recon += float(((pred[b, m] - t) ** 2).mean())
            count += 1
    recon /= count
    align = float(((lat - tgt) ** 2).mean())
    assert float(out["recon_loss"]) == pytest.approx(recon, rel=1e-5)
    assert float(out["align_loss"]) == pytest.approx(align, rel=1e-5)
    assert float(out["loss"].detach()) == pytest.approx(recon + 2.0 * align, rel=1e-5)


def test_reconstruct_keeps_visible_patches() -> None:
    method = cae(norm_pix_loss=False).eval()
    x = torch.randn(3, 1, 16, 16)
    mask = method.sample_mask(3, x.device)
    masked, recon = method.reconstruct(x, mask)
    px, pm, pr = patchify(x, 4), patchify(masked, 4), patchify(recon, 4)
    assert torch.equal(pm[~mask], px[~mask]) and torch.all(pm[mask] == 0)
    assert torch.equal(pr[~mask], px[~mask])
    torch.testing.assert_close(pr[mask], method.forward_latents(x, mask)[0].reshape(-1, 16))


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        cae(mask_ratio=1.0)
    with pytest.raises(ValueError, match="decoder_num_heads"):
        cae(decoder_embed_dim=30, decoder_num_heads=4)
    convnet = BACKBONES.build("convnet", in_channels=1, image_size=16, width=8)
    with pytest.raises(TypeError, match="Vision Transformer"):
        CAE(convnet, in_channels=1)


@pytest.fixture(scope="module")
def digits16() -> DataSplits:
    return DATASETS.build("digits", image_size=16)


def test_cae_loss_falls_on_digits(digits16: DataSplits) -> None:
    torch.manual_seed(0)
    method = cae()
    recipe = VIEW_RECIPES.build(
        "single_view", image_size=16, in_channels=1, mean=digits16.mean, std=digits16.std, crop_scale=(0.5, 1.0)
    )
    images = to_float(digits16.pretrain.images)
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=2e-3)
    gen = torch.Generator().manual_seed(1)
    recon = []
    losses = []
    for _ in range(40):
        idx = torch.randint(len(images), (32,), generator=gen)
        out = method.training_step(batch_of(recipe(images[idx])[0]), INFO)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out["loss"].detach()))
        recon.append(float(out["recon_loss"]))
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10]), losses
    assert sum(recon[-10:]) < 0.9 * sum(recon[:10]), recon


def test_cae_runs_through_the_engine(tmp_path: Path) -> None:
    cfg = vit_config(
        tmp_path,
        "cae",
        "method.decoder_embed_dim=16",
        "method.regressor_depth=1",
        "method.decoder_depth=1",
        "method.decoder_num_heads=2",
        "method.mask_min_block=2",
    )
    run = PretrainRun(cfg)
    run.fit()
    text = (run.run_dir / "metrics.jsonl").read_text()
    assert "align_loss" in text and "recon_loss" in text
