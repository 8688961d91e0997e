"""DINOv2: the combined loss is the sum of its parts computed separately, register tokens never
reach the heads, the paper's defaults and schedules, and a tiny training run that learns
without collapsing."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from selfsup.data import DataSplits
from selfsup.engine.run import PretrainRun
from selfsup.losses import masked_patch_cross_entropy
from selfsup.methods.base import Batch, StepInfo
from selfsup.methods.dinov2 import DINOv2
from selfsup.nn.backbones.vit import DropPath
from selfsup.nn.ema import update_ema
from selfsup.registry import DATASETS, METHODS, VIEW_RECIPES
from selfsup.transforms import to_float
from tests.conftest import tiny_config
from tests.losses.test_distillation import ref_koleo
from tests.methods.test_ibot import fixed_mask, info, views, vit
from tests.nn.test_sinkhorn import ref_sinkhorn

HEAD = {"proj_hidden_dim": 32, "proj_dim": 16, "out_dim": 32, "patch_out_dim": 24}


def small_dinov2(num_registers: int = 0, **kwargs: Any) -> DINOv2:
    backbone = vit(num_registers=num_registers)
    return METHODS.build("dinov2", backbone=backbone, **{**HEAD, **kwargs})


def ref_swapped_cross_entropy(student: list[Tensor], targets: list[Tensor], student_temp: float) -> float:
    """DINO's class loss in float64: mean over pairs (teacher crop i, student crop v != i) of
    the batch mean of -sum_k q_ik log softmax(s_v / tau_s)_k."""
    total, pairs = 0.0, 0
    for i, q in enumerate(targets):
        for v, s in enumerate(student):
            if v == i:
                continue
            log_p = torch.log_softmax(s.double() / student_temp, dim=-1)
            total += float(-(q.double() * log_p).sum(dim=-1).mean())
            pairs += 1
    return total / pairs


def test_combined_loss_equals_the_sum_of_its_parts_computed_separately(monkeypatch: pytest.MonkeyPatch) -> None:
    method = small_dinov2(drop_path_rate=0.0)
    vs = views()
    mask = fixed_mask(16)
    monkeypatch.setattr(method, "sample_masks", lambda num, gh, gw, device: mask)
    step = info(method, epoch=30.0)  # after the warm-up: teacher temperature 0.07
    out = method.training_step(Batch(views=vs, index=torch.arange(8)), step)

    global_crops = torch.cat(vs[:2])
    assert method.patch_head is not None and method.teacher_patch_head is not None
    with torch.no_grad():
        s_tokens = method.backbone.forward_tokens(global_crops, mask=mask)
        s_local = method.backbone.forward_tokens(torch.cat(vs[2:]))[:, 0]
        student_cls = list(method.head(torch.cat([s_tokens[:, 0], s_local])).chunk(4))
        student_patch = method.patch_head(s_tokens[:, 1:][mask])
        t_tokens = method.teacher_backbone.forward_tokens(global_crops)
        teacher_cls = method.teacher_head(t_tokens[:, 0])
        teacher_patch = method.teacher_patch_head(t_tokens[:, 1:][mask])  # masked patches only
    # Sinkhorn-Knopp (3 iterations at epsilon = the teacher temperature) for both, no centre.
    cls_codes = torch.tensor(ref_sinkhorn(teacher_cls.double().tolist(), 0.07, 3), dtype=torch.float64)
    patch_codes = torch.tensor(ref_sinkhorn(teacher_patch.double().tolist(), 0.07, 3), dtype=torch.float64)
    dino = ref_swapped_cross_entropy(student_cls, list(cls_codes.chunk(2)), 0.1)
    ibot = float(masked_patch_cross_entropy(student_patch.double(), patch_codes, mask, 0.1))
    koleo = sum(ref_koleo(c.double(), 1e-8) for c in s_tokens[:, 0].chunk(2))  # student class tokens
    assert float(out["cls_loss"]) == pytest.approx(dino, rel=1e-4)
    assert float(out["patch_loss"]) == pytest.approx(ibot, rel=1e-4)
    assert float(out["koleo"]) == pytest.approx(koleo, rel=1e-4)
    assert float(out["loss"].detach()) == pytest.approx(dino + ibot + 0.1 * koleo, rel=1e-4)
    assert "teacher_logits" not in out  # Sinkhorn centering keeps no centre to update


def test_register_tokens_never_reach_the_class_token_head(monkeypatch: pytest.MonkeyPatch) -> None:
    r = 3
    method = small_dinov2(num_registers=r, drop_path_rate=0.0)
    vs = views()
    mask = fixed_mask(16)
    monkeypatch.setattr(method, "sample_masks", lambda num, gh, gw, device: mask)
    assert method.patch_head is not None
    seen: dict[str, list[Tensor]] = {"head": [], "patch_head": [], "teacher_head": []}
    for name in seen:
        module = getattr(method, name)
        module.register_forward_pre_hook(lambda _m, args, name=name: seen[name].append(args[0].detach()))
    out = method.training_step(Batch(views=vs, index=torch.arange(8)), info(method))

    global_crops = torch.cat(vs[:2])
    with torch.no_grad():
        every = method.backbone.forward_all_tokens(global_crops, mask=mask)  # (N, 1 + R + L, D)
        local = method.backbone.forward_all_tokens(torch.cat(vs[2:]))
        teacher_every = method.teacher_backbone.forward_all_tokens(global_crops)
    (head_in,) = seen["head"]
    assert head_in.shape == (16 + 16, 32)  # one class token per crop, nothing else
    torch.testing.assert_close(head_in, torch.cat([every[:, 0], local[:, 0]]))
    torch.testing.assert_close(seen["teacher_head"][0], teacher_every[:, 0])
    (patch_in,) = seen["patch_head"]
    torch.testing.assert_close(patch_in, every[:, 1 + r :][mask])  # patch tokens at masked positions
    registers = torch.cat([every[:, 1 : 1 + r], local[:, 1 : 1 + r]]).reshape(-1, 32)
    assert not torch.isclose(torch.cdist(head_in, registers), torch.zeros(())).any()
    # They are still trained: the class token attends to them.
    out["loss"].backward()
    assert method.backbone.register_tokens is not None and method.backbone.register_tokens.grad is not None


def test_the_papers_defaults_and_schedules() -> None:
    params = inspect.signature(DINOv2).parameters
    defaults = {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}
    assert defaults["out_dim"] == defaults["patch_out_dim"] == 65536
    assert (defaults["proj_hidden_dim"], defaults["proj_dim"]) == (2048, 256)
    assert defaults["koleo_weight"] == 0.1 and defaults["layer_decay"] == 0.9 and defaults["drop_path_rate"] == 0.1
    assert defaults["mask_ratio"] == (0.1, 0.5) and defaults["mask_probability"] == 0.5
    assert defaults["freeze_last_layer_epochs"] == 1.0 and DINOv2.default_ema_momentum == (0.992, 1.0)

    method = small_dinov2()  # the paper's drop path, layer decay, separate heads, Sinkhorn
    assert method.centering == "sinkhorn" and method.sinkhorn_iterations == 3
    assert method.patch_head is not None and len(method.ema_pairs()) == 3
    temps = method.schedules()
    assert [temps["teacher_temp"](0, 100, e) for e in (0.0, 15.0, 30.0, 90.0)] == pytest.approx(
        [0.04, 0.055, 0.07, 0.07]
    )
    assert temps["teacher_patch_temp"](0, 100, 15.0) == pytest.approx(0.055)
    # Drop path 0.1 at the last block of the student, none in the teacher.
    assert [m.p for m in method.backbone.modules() if isinstance(m, DropPath)] == pytest.approx([0.0, 0.1])
    assert all(m.p == 0.0 for m in method.teacher_backbone.modules() if isinstance(m, DropPath))
    # Layer-wise lr decay 0.9 over (embeddings, block 0, block 1, rest): heads at the full rate.
    groups = method.param_groups()
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in method.parameters() if p.requires_grad)
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    assert scale["backbone.cls_token"] == pytest.approx(0.9**3)
    assert scale["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(0.9**2)
    assert scale["backbone.blocks.1.attn.qkv.weight"] == pytest.approx(0.9)
    assert scale["head.mlp.0.weight"] == scale["patch_head.mlp.0.weight"] == scale["backbone.norm.weight"] == 1.0
    # Last layers of both heads frozen during the first epoch.
    batch = Batch(views=views(), index=torch.arange(8))
    for epoch, frozen in ((0.5, True), (1.0, False)):
        method.training_step(batch, info(method, epoch=epoch))["loss"].backward()
        method.on_after_backward(info(method, epoch=epoch))
        lasts = method.head.last_layer_parameters()[:1] + method.patch_head.last_layer_parameters()[:1]
        assert all((p.grad is None) == frozen for p in lasts)
        method.zero_grad()


@pytest.fixture(scope="module")
def digits16() -> DataSplits:
    return DATASETS.build("digits", image_size=16)


def _spread(features: Tensor) -> tuple[float, float]:
    """(mean per-dimension std, effective rank) of L2-normalised features: both ~0 / ~1 when
    every image maps to one point (complete or dimensional collapse)."""
    f = torch.nn.functional.normalize(features, dim=1)
    singular = torch.linalg.svdvals(f - f.mean(dim=0))
    p = singular / singular.sum()
    return float(f.std(dim=0).mean()), float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))


def test_tiny_training_lowers_the_loss_without_collapse(digits16: DataSplits) -> None:
    torch.manual_seed(0)
    method = small_dinov2(
        num_registers=2, out_dim=64, patch_out_dim=64, warmup_teacher_temp_epochs=0, freeze_last_layer_epochs=0
    )
    recipe = VIEW_RECIPES.build(
        "multi_crop", image_size=16, in_channels=1, mean=digits16.mean, std=digits16.std, num_local=2, local_size=8
    )
    images = to_float(digits16.pretrain.images)
    probe = (images[:256] - digits16.mean[0]) / digits16.std[0]
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.04)
    gen = torch.Generator().manual_seed(1)
    steps, losses = 30, []
    for step in range(steps):
        idx = torch.randint(len(images), (32,), generator=gen)
        at = StepInfo(step=step, total_steps=steps, epoch=step / 10).with_schedules(method.schedules())
        out = method.training_step(Batch(views=recipe(images[idx]), index=idx), at)
        out["loss"].backward()
        method.on_after_backward(at)
        opt.step()
        opt.zero_grad()
        for student, teacher in method.ema_pairs():
            update_ema(student, teacher, 0.99)
        method.on_step_end(at, {k: v.detach() for k, v in out.items()})
        losses.append(float(out["loss"].detach()))
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses
    method.eval()
    std, rank = _spread(method.embed(probe))  # the teacher, which DINOv2 evaluates
    assert std > 0.2 / math.sqrt(32) and rank > 32 / 4, (std, rank)


def test_the_trainer_drives_dinov2_with_registers_and_layer_decay(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        "dinov2",
        "train.max_steps=3",
        "data.image_size=16",
        "views.num_local=2",
        "views.local_size=8",
        *(f"method.{k}={v}" for k, v in HEAD.items()),
    )
    cfg.backbone = {
        "name": "vit_tiny",
        "patch_size": 4,
        "embed_dim": 16,
        "depth": 2,
        "num_heads": 2,
        "num_registers": 2,
    }
    trainer = PretrainRun(cfg)
    trainer.fit()
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [0, 1, 2]
    assert all(math.isfinite(r["loss"]) and r["koleo"] > 0 and r["patch_loss"] > 0 for r in steps)
    scales = {g["name"]: g["lr_scale"] for g in trainer.optimizer.param_groups}
    assert scales["layer0_no_decay"] == pytest.approx(0.9**3)
