"""data2vec: teacher targets against a float64 recomputation from the block outputs, the smooth L1
at masked positions, what the EMA averages, and a tiny run through the engine that learns
without collapsing."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from selfsup.engine.run import PretrainRun
from selfsup.methods.base import Batch, StepInfo
from selfsup.methods.data2vec import Data2Vec
from selfsup.monitors import feature_std
from selfsup.nn.ema import update_ema
from selfsup.registry import BACKBONES
from tests.losses.test_feature_targets import ref_smooth_l1_loss, ref_targets
from tests.methods.test_masked_methods import vit_config
from tests.methods.test_maskfeat import digits

INFO = StepInfo(step=0, total_steps=10, epoch=0.0, lr=0.1, ema_momentum=0.999)
# A 16 px ViT with 4 px patches (L = 16) and 4 blocks: K = 2 by default.
VIT = dict(in_channels=1, image_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2)


def vit(**kw: int) -> torch.nn.Module:
    return BACKBONES.build("vit_tiny", **{**VIT, **kw})


def layer_outputs_by_hooks(backbone: torch.nn.Module, x: Tensor, target_layer: str) -> list[Tensor]:
    """Each block's output (or its FFN branch's output) of a full forward pass, caught by hooks:
    independent of how the method runs its teacher's blocks."""
    caught: list[Tensor] = []
    modules = [b if target_layer == "block" else b.mlp for b in backbone.blocks]
    handles = [m.register_forward_hook(lambda m, args, out: caught.append(out[:, 1:])) for m in modules]
    with torch.no_grad():
        backbone.forward_tokens(x)
    for h in handles:
        h.remove()
    return caught


@pytest.mark.parametrize("target_layer", ["ffn", "block"])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_targets_equal_a_float64_recompute_from_the_teachers_block_outputs(target_layer: str, layer_norm: bool) -> None:
    method = Data2Vec(vit(), target_layer=target_layer, layer_norm_targets=layer_norm)
    assert method.top_k_blocks == 2
    with torch.no_grad():  # a teacher that differs from the student, as after some EMA steps
        for p in method.teacher_blocks.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(3, 1, 16, 16)
    got = method.targets(x)

    # float64 reference: the shared embedding with the teacher's blocks, run by the plain forward.
    reference = copy.deepcopy(method.backbone).double()
    reference.blocks = copy.deepcopy(method.teacher_blocks).double()
    outputs = layer_outputs_by_hooks(reference, x.double(), target_layer)
    assert len(outputs) == 4
    expected = ref_targets(outputs[-2:], layer_norm)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    # The student's own blocks give other targets: the teacher's are used.
    student = layer_outputs_by_hooks(method.backbone, x, target_layer)
    assert not torch.allclose(got, ref_targets([o.double() for o in student[-2:]], layer_norm).float(), atol=1e-3)


def test_loss_is_smooth_l1_at_masked_positions_and_only_the_student_learns() -> None:
    method = Data2Vec(vit(), loss_beta=2.0)
    x = torch.rand(4, 1, 16, 16)
    torch.manual_seed(3)
    out = method.training_step(Batch(views=[x], index=torch.arange(4)), INFO)
    out["loss"].backward()
    torch.manual_seed(3)
    mask = method.sample_mask(4, x.device)
    assert mask.any(1).all() and not mask.all(1).any()
    pred, _ = method.predict(x, mask)
    expected = ref_smooth_l1_loss(pred.detach().double(), method.targets(x).double(), mask, beta=2.0)
    assert float(out["loss"].detach()) == pytest.approx(expected, rel=1e-5)
    assert method.backbone.mask_token.grad is not None and method.backbone.mask_token.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in method.teacher_blocks.parameters())
    assert float(out["target_std"]) > 0.5 and float(out["z_std"]) > 0


def test_ema_averages_the_blocks_and_the_teacher_runs_in_eval_mode() -> None:
    method = Data2Vec(vit(drop_path_rate=0.5), top_k_blocks=3)
    assert method.default_ema_momentum == (0.999, 0.9999)
    ((student, teacher),) = method.ema_pairs()
    assert student is method.backbone.blocks and teacher is method.teacher_blocks
    method.train()
    assert method.backbone.training and not any(m.training for m in method.teacher_blocks.modules())
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(method.targets(x), method.targets(x))  # no drop path in the teacher
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [t.clone() for t in teacher.parameters()]
    update_ema(student, teacher, 0.9)
    for b, t, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)


def test_bad_options_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match=r"top_k_blocks must be in \[1, 4\]"):
        Data2Vec(vit(), top_k_blocks=5)
    with pytest.raises(ValueError, match="target_layer"):
        Data2Vec(vit(), target_layer="attn")
    with pytest.raises(TypeError, match="Vision Transformer"):
        Data2Vec(BACKBONES.build("convnet", in_channels=1, image_size=16, width=8))
    with pytest.raises(TypeError, match="at least one block"):
        Data2Vec(vit(depth=0))


def test_data2vec_learns_through_the_engine_without_collapse(tmp_path: Path) -> None:
    """40 steps on digits (8 px, 2 px patches, 2 blocks, K = 1): the loss falls, the teacher
    follows the student by EMA, and the student's tokens stay spread over the batch."""
    cfg = vit_config(
        tmp_path,
        "data2vec",
        "backbone.depth=2",
        "backbone.embed_dim=32",
        "train.epochs=10",
        "train.max_steps=40",
        "train.ema_momentum=[0.99,0.999]",
        "optim.lr=0.003",
        "optim.lr_scaling=none",
    )
    trainer = PretrainRun(cfg)
    method = trainer.method
    assert isinstance(method, Data2Vec)
    x = digits(256)
    with torch.no_grad():
        before = feature_std(method.backbone.forward_tokens(x)[:, 1:].flatten(0, 1))
    teacher0 = [p.clone() for p in method.teacher_blocks.parameters()]
    trainer.fit()
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    losses = [r["loss"] for r in steps]
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:5]) / 5, losses
    assert all(r["target_std"] > 0.5 for r in steps)  # instance-normalised targets never collapse
    moved = [(p - p0).norm() for p, p0 in zip(method.teacher_blocks.parameters(), teacher0)]
    assert max(moved) > 0
    with torch.no_grad():
        after = feature_std(method.eval().backbone.forward_tokens(x)[:, 1:].flatten(0, 1))
    assert after > 0.5 * before, (before, after)
