"""DropPos: the encoder input, the position labels, the sigma schedule and learning on digits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from selfsup.data.base import DataSplits
from selfsup.engine.run import PretrainRun
from selfsup.losses import droppos_loss, patch_similarity_weights, position_smoothing_targets
from selfsup.methods.base import Batch, StepInfo
from selfsup.methods.droppos import DropPos
from selfsup.registry import BACKBONES, DATASETS, VIEW_RECIPES
from selfsup.transforms import to_float
from tests.methods.test_masked_methods import vit_config

VIT = dict(in_channels=1, image_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)


def droppos(**kw: object) -> DropPos:
    backbone = BACKBONES.build("vit_tiny", **VIT)
    return DropPos(backbone, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, **kw)  # type: ignore[arg-type]


def info(method: DropPos, step: int = 0, total: int = 10) -> StepInfo:
    return StepInfo(step=step, total_steps=total, epoch=0.0).with_schedules(method.schedules())


def batch_of(images: Tensor) -> Batch:
    return Batch(views=[images], index=torch.arange(images.shape[0]))


def test_masks_have_the_papers_ratios() -> None:
    method = droppos()
    keep, dropped = method.sample_masks(6, torch.device("cpu"))
    assert keep.shape == dropped.shape == (6, 4)  # 25% of 16 patches visible
    assert torch.all(dropped.sum(1) == 3)  # 75% of the visible positions dropped
    assert torch.all(keep[:, 1:] > keep[:, :-1])  # ascending, distinct grid indices


def test_dropped_tokens_carry_the_mask_token_and_the_labels_are_their_true_indices() -> None:
    """The encoder's input: class token with its position, then each visible patch's embedding
    plus its own position -- or the learned mask token where the position was dropped. The
    label of each dropped token is the grid index its pixels came from."""
    method = droppos(attentive=False)
    vit = method.backbone
    x = torch.randn(3, 1, 16, 16)
    seen: list[Tensor] = []
    vit.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    torch.manual_seed(5)
    loss = method.training_step(batch_of(x), info(method))["loss"].detach()
    torch.manual_seed(5)
    keep, dropped = method.sample_masks(3, x.device)
    tokens = seen[0]
    assert tokens.shape == (3, 1 + 4, 32)  # the encoder sees the visible patches only
    with torch.no_grad():
        patches = vit.patch_embed(x)  # (B, L, D), before any position
        pos = vit.pos_embed[0, 1:]
        torch.testing.assert_close(tokens[:, 0], (vit.cls_token + vit.pos_embed[:, :1])[:, 0].expand(3, -1))
        for b in range(3):
            for k in range(4):
                label = int(keep[b, k])
                extra = method.mask_pos_token[0, 0] if dropped[b, k] else pos[label]
                torch.testing.assert_close(tokens[b, 1 + k], patches[b, label] + extra)
        # The step's loss is the position loss with exactly those labels.
        logits = method.predict(x, keep, dropped)
        expected, _ = droppos_loss(logits, keep, dropped, position_smoothing_targets(4, 4, 1.0))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_attentive_weights_come_from_the_full_image_without_gradient() -> None:
    method = droppos()
    x = torch.randn(4, 1, 16, 16)
    torch.manual_seed(2)
    loss = method.training_step(batch_of(x), info(method))["loss"]
    torch.manual_seed(2)
    keep, dropped = method.sample_masks(4, x.device)
    with torch.no_grad():
        weights = patch_similarity_weights(method.backbone.forward_tokens(x), keep)
        expected, _ = droppos_loss(
            method.predict(x, keep, dropped), keep, dropped, position_smoothing_targets(4, 4, 1.0), weights
        )
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()  # the no-grad full pass adds nothing to the graph: gradients still arrive
    assert method.mask_pos_token.grad is not None and method.mask_pos_token.grad.abs().sum() > 0


def test_sigma_decays_linearly_to_zero() -> None:
    method = droppos(smoothing_sigma=1.0)
    assert [method.sigma_at(info(method, s, 10)) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    fixed = droppos(smoothing_sigma=0.7, sigma_decay=False)
    assert fixed.schedules() == {} and fixed.sigma_at(info(fixed, 9, 10)) == 0.7


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="position_mask_ratio"):
        droppos(position_mask_ratio=0.0)
    with pytest.raises(ValueError, match="drop no position"):
        droppos(mask_ratio=0.97, position_mask_ratio=0.1)
    convnet = BACKBONES.build("convnet", in_channels=1, image_size=16, width=8)
    with pytest.raises(TypeError, match="Vision Transformer"):
        DropPos(convnet)
    with pytest.raises(ValueError, match="training grid"):
        droppos().training_step(batch_of(torch.randn(2, 1, 24, 24)), info(droppos()))


@pytest.fixture(scope="module")
def digits16() -> DataSplits:
    return DATASETS.build("digits", image_size=16)


def test_position_accuracy_rises_above_chance_on_digits(digits16: DataSplits) -> None:
    """100 AdamW steps on 16 px digits: the loss falls and the top-1 position accuracy of the
    dropped patches climbs well above chance (1/16): digits' strokes tell where a patch sits."""
    torch.manual_seed(0)
    method = droppos(mask_ratio=0.5)  # 8 visible patches, 6 of them without their position
    recipe = VIEW_RECIPES.build(
        "single_view", image_size=16, in_channels=1, mean=digits16.mean, std=digits16.std, crop_scale=(0.8, 1.0)
    )
    images = to_float(digits16.pretrain.images)
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=2e-3)
    gen = torch.Generator().manual_seed(1)
    losses, accs = [], []
    steps = 100
    for step in range(steps):
        idx = torch.randint(len(images), (64,), generator=gen)
        out = method.training_step(batch_of(recipe(images[idx])[0]), info(method, step, steps))
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out["loss"].detach()))
        accs.append(float(out["position_acc"]))
    first, last = sum(accs[:10]) / 10, sum(accs[-20:]) / 20
    assert last > 2.5 / 16 and last > first + 0.08, (first, last)
    # sigma shrinks over the run, which raises the loss floor; the fall must beat that.
    assert sum(losses[-20:]) / 20 < 0.9 * sum(losses[:10]) / 10, losses


def test_droppos_runs_through_the_engine_and_logs_position_accuracy(tmp_path: Path) -> None:
    cfg = vit_config(
        tmp_path, "droppos", "method.decoder_embed_dim=16", "method.decoder_depth=1", "method.decoder_num_heads=2"
    )
    run = PretrainRun(cfg)
    run.fit()
    text = (run.run_dir / "metrics.jsonl").read_text()
    assert "position_acc" in text
