"""SimSiam, Barlow Twins, SwAV and DINO: what each paper relies on, beyond the contract tests
of test_methods.py; tiny end-to-end runs through the engine; DINO attention maps."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import Tensor

import selfsup.methods.swav as swav_module
from selfsup.data import DataSplits
from selfsup.engine.run import PretrainRun
from selfsup.losses import barlow_twins_loss, dino_loss
from selfsup.methods.base import Batch, Method, StepInfo
from selfsup.nn.ema import update_ema
from selfsup.nn.multicrop import encode_by_resolution
from selfsup.registry import BACKBONES, DATASETS, METHODS, VIEW_RECIPES
from selfsup.transforms import to_float
from selfsup.visualize import attention_maps, cls_attention_maps, main
from tests.conftest import tiny_config
from tests.losses.test_distillation import ref_koleo
from tests.nn.test_sinkhorn import ref_sinkhorn


def convnet(image_size: int = 16) -> torch.nn.Module:
    return BACKBONES.build("convnet", in_channels=1, image_size=image_size, width=8)


def make_views(recipe: str, batch_size: int = 8, image_size: int = 16, **options: object) -> list[Tensor]:
    build = VIEW_RECIPES.build(recipe, image_size=image_size, in_channels=1, mean=(0.5,), std=(0.25,), **options)
    return build(torch.rand(batch_size, 1, image_size, image_size))


def batch_of(views: list[Tensor]) -> Batch:
    return Batch(views=views, index=torch.arange(views[0].shape[0]))


def info(step: int = 0, epoch: float = 0.0, total: int = 100, method: Method | None = None) -> StepInfo:
    """A step at ``epoch``, with ``method``'s own scheduled values when given."""
    plain = StepInfo(step=step, total_steps=total, epoch=epoch, lr=0.1, ema_momentum=0.9)
    return plain.with_schedules(method.schedules()) if method is not None else plain


def trainable(method: Method) -> list[torch.nn.Parameter]:
    return [p for p in method.parameters() if p.requires_grad]


@pytest.fixture(scope="module")
def digits16() -> DataSplits:
    return DATASETS.build("digits", image_size=16)


# ------------------------------------------------------------------------------ SimSiam
def _simsiam_monitors(splits: DataSplits, stop_gradient: bool, steps: int = 80) -> tuple[float, float]:
    """Mean ``z_std`` and ``p_std`` of the last 10 of ``steps`` Adam steps on digits."""
    torch.manual_seed(0)
    method = METHODS.build(
        "simsiam", backbone=convnet(), proj_hidden_dim=64, proj_dim=64, pred_hidden_dim=16, stop_gradient=stop_gradient
    )
    recipe = VIEW_RECIPES.build(
        "two_views", image_size=16, in_channels=1, mean=splits.mean, std=splits.std, crop_scale=(0.5, 1.0)
    )
    images = to_float(splits.pretrain.images)
    opt = torch.optim.Adam(trainable(method), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    z_std, p_std = [], []
    for step in range(steps):
        idx = torch.randint(len(images), (32,), generator=gen)
        out = method.training_step(Batch(views=recipe(images[idx]), index=idx), info(step, total=steps, method=method))
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        z_std.append(float(out["z_std"]))
        p_std.append(float(out["p_std"]))
    return sum(z_std[-10:]) / 10, sum(p_std[-10:]) / 10


def test_simsiam_collapses_without_stop_gradient_only(digits16: DataSplits) -> None:
    """Figure 2 of the paper: without stop-gradient the output std falls to ~0; with it, the
    normalised outputs stay spread (~1/sqrt(d))."""
    healthy = 1 / math.sqrt(64)
    z_sg, p_sg = _simsiam_monitors(digits16, stop_gradient=True)
    z_no, p_no = _simsiam_monitors(digits16, stop_gradient=False)
    assert z_sg > 0.8 * healthy and p_sg > 0.3 * healthy, (z_sg, p_sg)
    assert p_no < 0.2 * healthy, p_no
    assert z_no < 0.75 * z_sg, (z_no, z_sg)


def test_simsiam_predictor_keeps_the_peak_lr_while_the_rest_follows_the_schedule() -> None:
    """Sec. 4.4 of the paper: the predictor's lr is not decayed."""
    from selfsup.config import OptimConfig
    from selfsup.engine.optim import build_optimizer, set_schedule

    method = METHODS.build("simsiam", backbone=convnet(), proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=8)
    optimizer = build_optimizer(method.param_groups(), OptimConfig(name="sgd", weight_decay=1e-4), lr=0.05)
    predictor = {id(p) for p in method.predictor.parameters()}
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in trainable(method))  # every parameter exactly once
    set_schedule(optimizer, lr=0.001, weight_decay=1e-4)
    for group in optimizer.param_groups:
        owns_predictor = {id(p) in predictor for p in group["params"]}
        assert len(owns_predictor) == 1
        assert group["lr"] == (0.05 if owns_predictor == {True} else 0.001), group["name"]
    unfixed = METHODS.build(
        "simsiam", backbone=convnet(), proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=8, fix_predictor_lr=False
    )
    optimizer = build_optimizer(unfixed.param_groups(), OptimConfig(name="sgd"), lr=0.05)
    set_schedule(optimizer, lr=0.001, weight_decay=0.0)
    assert {g["lr"] for g in optimizer.param_groups} == {0.001}


# ------------------------------------------------------------------------ Barlow Twins
def test_barlow_twins_loss_is_the_loss_function_on_its_projections() -> None:
    method = METHODS.build("barlow_twins", backbone=convnet(), proj_hidden_dim=32, proj_dim=16, lambda_offdiag=0.01)
    views = make_views("asymmetric", batch_size=16)
    loss = method.training_step(batch_of(views), info(method=method))["loss"]
    with torch.no_grad():  # training-mode BN: the same batches give the same projections
        z_a = method.projector(method.backbone(views[0]))
        z_b = method.projector(method.backbone(views[1]))
    torch.testing.assert_close(loss.detach(), barlow_twins_loss(z_a, z_b, lambda_offdiag=0.01))
    assert not torch.allclose(loss.detach(), barlow_twins_loss(z_a, z_b, lambda_offdiag=5e-3))


def test_barlow_twins_biases_and_norms_get_the_papers_lr_ratio() -> None:
    method = METHODS.build("barlow_twins", backbone=convnet(), proj_hidden_dim=32, proj_dim=16)
    groups = {g["name"]: g for g in method.param_groups()}
    assert groups["no_decay"]["lr_scale"] == pytest.approx(0.0048 / 0.2)
    assert groups["decay"].get("lr_scale", 1.0) == 1.0


# -------------------------------------------------------------------------------- SwAV
@pytest.fixture
def sinkhorn_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Tensor, Tensor]]:
    """Records every ``(scores, codes)`` pair SwAV's Sinkhorn-Knopp call sees."""
    calls: list[tuple[Tensor, Tensor]] = []
    original = swav_module.sinkhorn_knopp

    def recording(scores: Tensor, *args: object, **kwargs: object) -> Tensor:
        codes = original(scores, *args, **kwargs)
        calls.append((scores.clone(), codes.clone()))
        return codes

    monkeypatch.setattr(swav_module, "sinkhorn_knopp", recording)
    return calls


def small_swav(**kwargs: object) -> Method:
    options = {"proj_hidden_dim": 32, "proj_dim": 16, "num_prototypes": 8, **kwargs}
    return METHODS.build("swav", backbone=convnet(), **options)


@pytest.mark.parametrize("num_global", [2, 3])
def test_swav_codes_come_from_the_global_crops_only(sinkhorn_calls: list, num_global: int) -> None:
    method = small_swav(num_global_crops=num_global)
    views = make_views("multi_crop", num_global=num_global, num_local=4)
    z: list[Tensor] = []  # the prototypes may be a constant of the step (frozen): score z here
    method.projector.register_forward_hook(lambda mod, inp, out: z.append(torch.nn.functional.normalize(out, dim=1)))
    method.training_step(batch_of(views), info(method=method))
    per_view = torch.nn.functional.linear(z[0], method.prototypes.weight).detach().chunk(len(views))
    assert len(sinkhorn_calls) == num_global
    for i, (s, _) in enumerate(sinkhorn_calls):
        assert torch.equal(s, per_view[i])


@pytest.mark.parametrize("iterations, tolerance", [(3, 0.1), (50, 1e-3)])
def test_swav_codes_are_equipartitioned(sinkhorn_calls: list, iterations: int, tolerance: float) -> None:
    method = small_swav(num_prototypes=4, sinkhorn_iterations=iterations)
    method.training_step(batch_of(make_views("multi_crop", batch_size=64, num_local=2)), info(method=method))
    assert len(sinkhorn_calls) == 2
    for scores, codes in sinkhorn_calls:
        torch.testing.assert_close(codes.sum(dim=1), torch.ones(64))
        share = codes.sum(dim=0) / 64  # each prototype's share of the batch, ideally 1/4
        naive = torch.softmax(scores / method.sinkhorn_epsilon, dim=1).sum(dim=0) / 64
        # The paper's three iterations balance the columns closely, not exactly.
        assert (share - 0.25).abs().max() < tolerance, share
        assert (naive - 0.25).abs().max() > 2 * (share - 0.25).abs().max(), (naive, share)


def test_swav_queue_fills_after_its_epoch_in_on_step_end_and_joins_sinkhorn(sinkhorn_calls: list) -> None:
    method = small_swav(queue_length=32, epoch_queue_starts=1.0)
    batch = batch_of(make_views("multi_crop", batch_size=8, num_local=2))
    assert method.queue is not None
    out = method.training_step(batch, info(0, epoch=0.5, method=method))
    assert "queue_embeddings" not in out
    method.on_step_end(info(0, epoch=0.5), out)
    assert int(method.queue.filled) == 0  # before epoch_queue_starts
    for step, expected in ((1, 16), (2, 32)):  # two global crops of 8 per step
        out = method.training_step(batch, info(step, epoch=1.0, method=method))
        assert int(method.queue.filled) == expected - 16, "the forward must not touch the queue"
        method.on_step_end(info(step, epoch=1.0), out)
        assert int(method.queue.filled) == expected
    sinkhorn_calls.clear()
    method.training_step(batch, info(3, epoch=1.5, method=method))
    queued_scores = method.queue.values() @ method.prototypes.weight.detach().T
    for scores, _ in sinkhorn_calls:
        assert scores.shape[0] == 32 + 8
        torch.testing.assert_close(scores[:32], queued_scores)


def test_swav_prototypes_unit_norm_and_frozen_for_the_first_steps() -> None:
    method = small_swav(freeze_prototypes_steps=2)
    batch = batch_of(make_views("multi_crop", batch_size=16, num_local=2))
    # Weight decay and a large lr: a zero gradient would still move a parameter.
    opt = torch.optim.AdamW(trainable(method), lr=0.05, weight_decay=0.1)
    for step in range(4):
        before = method.prototypes.weight.detach().clone()
        projector_before = method.projector[0].weight.detach().clone()
        out = method.training_step(batch, info(step, method=method))
        out["loss"].backward()
        method.on_after_backward(info(step))
        opt.step()
        opt.zero_grad()
        stepped = method.prototypes.weight.detach().clone()
        method.on_step_end(info(step), out)
        after = method.prototypes.weight.detach()
        torch.testing.assert_close(after.norm(dim=1), torch.ones(8))
        assert not torch.equal(method.projector[0].weight, projector_before)
        if step < 2:
            assert torch.equal(stepped, before), f"prototypes moved at frozen step {step}"
        else:
            assert (after - before).abs().max() > 1e-3, f"prototypes did not move at step {step}"
            assert not torch.allclose(stepped.norm(dim=1), torch.ones(8)), "nothing left to normalise"


# -------------------------------------------------------------------------------- DINO
def small_dino(backbone: torch.nn.Module | None = None, **kwargs: object) -> Method:
    options = {"proj_hidden_dim": 32, "proj_dim": 16, "out_dim": 32, **kwargs}
    return METHODS.build("dino", backbone=backbone or convnet(), **options)


def dino_views(batch_size: int = 8, num_local: int = 2) -> list[Tensor]:
    return make_views("multi_crop", batch_size=batch_size, num_local=num_local, dino_asymmetry=True)


def test_dino_teacher_temperature_warms_up_linearly_over_epochs() -> None:
    method = small_dino()  # paper: 0.04 -> 0.07 over 30 epochs
    batch = batch_of(dino_views())
    for epoch, expected in ((0.0, 0.04), (15.0, 0.055), (30.0, 0.07), (45.0, 0.07)):
        assert method.schedules()["teacher_temp"](0, 100, epoch) == pytest.approx(expected)
        out = method.training_step(batch, info(epoch=epoch, method=method))
        assert float(out["teacher_temp"]) == pytest.approx(expected)


def test_dino_loss_and_center_follow_the_formulas_center_only_in_on_step_end() -> None:
    method = small_dino()
    views = dino_views()
    with torch.no_grad():
        method.center.normal_()  # a non-zero centre, so that subtracting it matters
    before = method.center.clone()
    out = method.training_step(batch_of(views), info(epoch=15.0, method=method))
    loss = out["loss"]
    assert torch.equal(method.center, before), "the forward must not update the centre"
    with torch.no_grad():  # training-mode BN: the same batches give the same outputs
        teacher = method.teacher_head(method.teacher_backbone(torch.cat(views[:2])))
        student = method.head(encode_by_resolution(method.backbone, views))
    expected = dino_loss(student.chunk(4), teacher.chunk(2), before, student_temp=0.1, teacher_temp=0.055)
    torch.testing.assert_close(loss.detach(), expected)
    method.on_step_end(info(epoch=15.0), out)
    torch.testing.assert_close(method.center, 0.9 * before + 0.1 * teacher.mean(dim=0, keepdim=True))


def test_dino_sinkhorn_centering_trains_on_dinov2_codes_and_keeps_no_centre() -> None:
    method = small_dino(centering="sinkhorn")  # DINOv2: SK codes of the teacher, 3 iterations
    views = dino_views()
    out = method.training_step(batch_of(views), info(epoch=15.0, method=method))
    with torch.no_grad():  # training-mode BN: the same batches give the same outputs
        teacher = method.teacher_head(method.teacher_backbone(torch.cat(views[:2]))).double()
        student = method.head(encode_by_resolution(method.backbone, views)).double()
    codes = torch.tensor(ref_sinkhorn(teacher.tolist(), eps=0.055, iters=3), dtype=torch.float64)
    total, pairs = 0.0, 0
    for i, p_t in enumerate(codes.chunk(2)):
        for v, s in enumerate(student.chunk(4)):
            if v != i:
                total -= float((p_t * torch.log_softmax(s / 0.1, dim=-1)).sum(dim=-1).mean())
                pairs += 1
    assert out["loss"].item() == pytest.approx(total / pairs, rel=1e-5)
    assert "teacher_logits" not in out
    method.on_step_end(info(epoch=15.0), out)
    assert torch.equal(method.center, torch.zeros_like(method.center)), "no centre under Sinkhorn centering"


def test_dino_koleo_adds_the_weighted_regulariser_of_each_global_crops_features() -> None:
    method = small_dino()
    views = dino_views()
    without = method.training_step(batch_of(views), info(method=method))["loss"].item()
    method.koleo_weight = 0.1  # DINOv2's weight
    out = method.training_step(batch_of(views), info(method=method))
    with torch.no_grad():  # the global crops share one backbone call inside the step
        features = method.backbone(torch.cat(views[:2])).double()
    expected = sum(ref_koleo(crop, eps=1e-8) for crop in features.chunk(2))
    # float32-sized tolerances: the reference recomputes the features in a separate backbone
    # call, whose float32 kernels may differ with the batch's composition (1e-5 seen on AVX-512).
    assert float(out["koleo"]) == pytest.approx(expected, rel=1e-4)
    assert out["loss"].item() - without == pytest.approx(0.1 * expected, rel=1e-3)
    out["loss"].backward()
    assert all(p.grad is not None for p in method.backbone.parameters())


@pytest.mark.parametrize("options", [{"centering": "mean"}, {"sinkhorn_iterations": 0}, {"koleo_weight": -1.0}])
def test_dino_rejects_bad_dinov2_options(options: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="centering|sinkhorn_iterations"):
        small_dino(**options)


def test_dino_last_layer_frozen_during_the_first_epoch_only() -> None:
    method = small_dino(norm_last_layer=False)  # so the gain g is trainable too
    batch = batch_of(dino_views())
    opt = torch.optim.AdamW(trainable(method), lr=0.01, weight_decay=0.1)
    last = method.head.last_layer_parameters()
    for step, epoch in enumerate((0.0, 0.9, 1.0)):
        last_before = [p.detach().clone() for p in last]
        mlp_before = method.head.mlp[0].weight.detach().clone()
        method.training_step(batch, info(step, epoch=epoch, method=method))["loss"].backward()
        method.on_after_backward(info(step, epoch=epoch))
        opt.step()
        opt.zero_grad()
        assert not torch.equal(method.head.mlp[0].weight, mlp_before)
        frozen = [torch.equal(p, b) for p, b in zip(last, last_before)]
        assert frozen == [epoch < 1.0] * 2, (epoch, frozen)


def test_dino_frozen_last_layer_gets_no_gradient_and_the_rest_the_same_one() -> None:
    # During the frozen epoch autograd skips the last layer's weight gradient (no GEMM
    # computed to be thrown away); every other gradient is what the unfrozen step computes.
    torch.manual_seed(0)
    method = small_dino(norm_last_layer=False, warmup_teacher_temp_epochs=0).double()  # same targets
    views = [v.double() for v in dino_views()]
    grads = {}
    for epoch in (0.0, 1.0):
        method.zero_grad()
        method.training_step(batch_of(views), info(epoch=epoch, method=method))["loss"].backward()
        grads[epoch] = {n: p.grad for n, p in method.named_parameters() if p.requires_grad}
    last = {"head.last_layer_v", "head.last_layer_g"}
    assert all(grads[0.0][n] is None for n in last) and all(grads[1.0][n] is not None for n in last)
    for name, grad in grads[1.0].items():
        if name not in last:
            torch.testing.assert_close(grads[0.0][name], grad, rtol=1e-12, atol=1e-14, msg=name)


def test_dino_teacher_sees_only_the_global_crops_student_one_call_per_size() -> None:
    method = small_dino()
    teacher_inputs: list[tuple[int, ...]] = []
    student_inputs: list[tuple[int, ...]] = []
    method.teacher_backbone.register_forward_hook(lambda m, inp, out: teacher_inputs.append(tuple(inp[0].shape)))
    method.backbone.register_forward_hook(lambda m, inp, out: student_inputs.append(tuple(inp[0].shape)))
    method.training_step(batch_of(dino_views(batch_size=8, num_local=4)), info(method=method))
    assert teacher_inputs == [(16, 1, 16, 16)]
    assert student_inputs == [(16, 1, 16, 16), (32, 1, 8, 8)]


def test_dino_evaluates_and_fine_tunes_the_teacher_unless_told_otherwise() -> None:
    from selfsup.engine.finetune import finetune_encoder

    method = small_dino()
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)  # student and teacher now differ
    images = torch.rand(4, 1, 16, 16)
    method.eval()
    torch.testing.assert_close(method.embed(images), method.teacher_backbone(images))
    assert not torch.allclose(method.embed(images), method.backbone(images))
    assert finetune_encoder(method, None, None) is method.teacher_backbone  # type: ignore[arg-type]
    method.evaluate_teacher = False
    torch.testing.assert_close(method.embed(images), method.backbone(images))


def test_dino_center_and_teacher_survive_a_state_dict_round_trip() -> None:
    method = small_dino()
    batch = batch_of(dino_views())
    opt = torch.optim.SGD(trainable(method), lr=0.1)
    for step in range(2):
        out = method.training_step(batch, info(step, epoch=1.0, method=method))
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        update_ema(method.backbone, method.teacher_backbone, 0.5)
        update_ema(method.head, method.teacher_head, 0.5)
        method.on_step_end(info(step, epoch=1.0), out)
    state = copy.deepcopy(method.state_dict())
    assert "center" in state and state["center"].abs().sum() > 0
    fresh = small_dino()
    assert not torch.equal(fresh.teacher_head.last_layer_v, method.teacher_head.last_layer_v)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.center, method.center)
    for a, b in zip(fresh.teacher_head.parameters(), method.teacher_head.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(method.teacher_head.last_layer_v, method.head.last_layer_v), "EMA never ran"
    loss_a = method.training_step(batch, info(epoch=1.0, method=method))["loss"]
    loss_b = fresh.training_step(batch, info(epoch=1.0, method=fresh))["loss"]
    assert torch.equal(loss_a, loss_b)


@pytest.mark.parametrize(
    "backbone",
    [
        lambda: BACKBONES.build("resnet18", in_channels=1, image_size=16, stem="cifar", width=0.125),
        lambda: BACKBONES.build(
            "vit_tiny", in_channels=1, image_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2
        ),
    ],
    ids=["resnet18", "vit_tiny"],
)
def test_dino_trains_resnet_and_vit_backbones(backbone: Callable[[], torch.nn.Module]) -> None:
    method = small_dino(backbone())
    out = method.training_step(batch_of(dino_views()), info(method=method))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in method.backbone.parameters() if p.requires_grad)


# -------------------------------------------------------------- through the real engine
def _swav_engine_state(method: Method) -> None:
    torch.testing.assert_close(method.prototypes.weight.norm(dim=1), torch.ones(16))
    assert int(method.queue.filled) == method.queue.size


def _dino_engine_state(method: Method) -> None:
    assert method.center.abs().sum() > 0
    assert not torch.equal(method.teacher_head.mlp[0].weight, method.head.mlp[0].weight)


MULTI_CROP = ["data.image_size=16", "views.num_local=2", "views.local_size=8"]
ENGINE_RUNS: dict[str, tuple[list[str], Callable[[Method], None] | None]] = {
    "simsiam": (["method.proj_hidden_dim=32", "method.proj_dim=32", "method.pred_hidden_dim=8"], None),
    "barlow_twins": (["method.proj_hidden_dim=32", "method.proj_dim=32", "optim.name=lars"], None),
    "swav": (
        [
            "method.proj_hidden_dim=32",
            "method.proj_dim=16",
            "method.num_prototypes=16",
            "method.freeze_prototypes_steps=1",
            "method.queue_length=128",
            "method.epoch_queue_starts=0",
            *MULTI_CROP,
        ],
        _swav_engine_state,
    ),
    "dino": (
        [
            "method.proj_hidden_dim=32",
            "method.proj_dim=16",
            "method.out_dim=64",
            "optim.clip_grad=3.0",
            "views.dino_asymmetry=true",
            *MULTI_CROP,
        ],
        _dino_engine_state,
    ),
}


@pytest.mark.parametrize("name", sorted(ENGINE_RUNS))
def test_the_trainer_drives_the_method(tmp_path: Path, name: str) -> None:
    overrides, check_state = ENGINE_RUNS[name]
    trainer = PretrainRun(tiny_config(tmp_path, name, "train.max_steps=3", *overrides))
    trainer.fit()
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses) == [0, 1, 2] and all(math.isfinite(v) for v in losses.values())
    if check_state is not None:
        check_state(trainer.method)


def test_the_trainer_drives_dino_with_dinov2_centering_and_koleo(tmp_path: Path) -> None:
    overrides = [*ENGINE_RUNS["dino"][0], "method.centering=sinkhorn", "method.koleo_weight=0.1"]
    trainer = PretrainRun(tiny_config(tmp_path, "dino", "train.max_steps=3", *overrides))
    trainer.fit()
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [0, 1, 2]
    assert all(math.isfinite(r["loss"]) and r["koleo"] > 0 for r in steps)
    assert trainer.method.center.abs().sum() == 0


# -------------------------------------------------------------------- attention maps
def test_cls_attention_maps_lay_patches_on_the_grid() -> None:
    attention = torch.rand(2, 3, 1 + 6, 1 + 6).softmax(dim=-1)
    maps = cls_attention_maps(attention, (2, 3), patch_size=4)
    assert maps.shape == (2, 3, 8, 12)
    # Token 1 + (row 1 * 3 + column 2) covers pixels [4:8, 8:12].
    assert torch.all(maps[1, 2, 4:8, 8:12] == attention[1, 2, 0, 1 + 5])
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), 16 * (1 - attention[:, :, 0, 0]))
    with pytest.raises(ValueError, match="patch grid"):
        cls_attention_maps(attention, (3, 3), patch_size=4)


def test_attention_maps_of_a_vit_dino_run(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "dino", "train.max_steps=1", *ENGINE_RUNS["dino"][0])
    cfg.backbone = {"name": "vit_tiny", "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2}
    trainer = PretrainRun(cfg)
    trainer.fit()
    paths = attention_maps(trainer.run_dir, [0, 5], tmp_path / "maps")
    assert [p.parent for p in paths] == [tmp_path / "maps"] * 2 and all(p.is_file() for p in paths)
    with Image.open(paths[0]) as png:
        assert png.size[0] > 2 * png.size[1]  # the image and two heads side by side
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("L", (20, 24), color=200).save(folder / "blank.png")
    assert len(attention_maps(trainer.run_dir, folder, tmp_path / "from_files", image_size=32)) == 1
    assert main(["attention", str(trainer.run_dir), "--images", "1", "--out", str(tmp_path / "cli")]) == 0
    assert len(list((tmp_path / "cli").glob("*.png"))) == 1


def test_attention_maps_need_a_vit(tmp_path: Path) -> None:
    trainer = PretrainRun(tiny_config(tmp_path, "simsiam", "train.max_steps=1", *ENGINE_RUNS["simsiam"][0]))
    trainer.fit()
    with pytest.raises(TypeError, match="ViT backbone"):
        attention_maps(trainer.run_dir, [0], tmp_path / "maps")


@pytest.mark.parametrize("method", ["swav", "dino"])
def test_the_engine_gives_the_method_the_recipes_number_of_global_crops(tmp_path: Path, method: str) -> None:
    from selfsup.config import ConfigError
    from selfsup.engine.build import build_components

    cfg = tiny_config(
        tmp_path, method, *MULTI_CROP, "views.num_global=3", "method.proj_hidden_dim=16", "method.proj_dim=8"
    )
    parts = build_components(cfg, torch.device("cpu"))
    assert parts.method.num_global_crops == 3 == parts.train_views.num_global_views
    with pytest.raises(ConfigError, match="num_global_crops"):
        build_components(tiny_config(tmp_path, method, *MULTI_CROP, "method.num_global_crops=2"), torch.device("cpu"))
