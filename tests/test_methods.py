"""Contract tests for every registered method (DESIGN.md test policy 2), driven by the registry."""

from __future__ import annotations

import copy

import pytest
import torch

from selfsup.methods.base import Batch, Method, StepInfo
from selfsup.registry import BACKBONES, METHODS, VIEW_RECIPES

METHOD_NAMES = METHODS.names()
SMALL = {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32,
         "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}


def build(name: str, in_channels: int = 1, image_size: int = 16) -> Method:
    cls = METHODS.get(name)
    if cls.requires_token_backbone:  # masked image modelling drops or replaces patch tokens
        backbone = BACKBONES.build("vit_tiny", in_channels=in_channels, image_size=image_size, patch_size=4,
                                   embed_dim=32, depth=1, num_heads=2)
    else:
        backbone = BACKBONES.build("convnet", in_channels=in_channels, image_size=image_size, width=8)
    import inspect

    params = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in SMALL.items() if k in params}
    known = {"num_samples": 256, "image_size": image_size, "in_channels": in_channels, "batch_size": 8,
             "num_classes": 10}
    kwargs.update({k: v for k, v in known.items() if k in params})
    return cls(backbone=backbone, **kwargs)


def make_batch(method: Method, batch_size: int = 8, image_size: int = 16) -> Batch:
    recipe = VIEW_RECIPES.build(method.view_recipe, image_size=image_size, in_channels=1, mean=(0.5,), std=(0.25,))
    # Smooth random images (4x4 noise upsampled): like natural images, neighbouring pixels
    # correlate, which masked-prediction methods rely on; white noise has nothing to predict.
    coarse = torch.rand(batch_size, 1, 4, 4)
    images = torch.nn.functional.interpolate(coarse, size=image_size, mode="bilinear", align_corners=False)
    return Batch(views=recipe(images), index=torch.arange(batch_size), label=torch.arange(batch_size) % 3,
                 images=images)


def info(step: int = 0, total: int = 10) -> StepInfo:
    return StepInfo(step=step, total_steps=total, epoch=0.0, lr=0.1, ema_momentum=0.9)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_loss_is_finite_scalar_and_gradients_reach_trainables_only(name: str) -> None:
    method = build(name)
    out = method.training_step(make_batch(method), info())
    loss = out["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for pname, p in method.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{pname} got no gradient"
        else:
            assert p.grad is None, f"frozen {pname} got a gradient"
    for student, teacher in method.ema_pairs():
        assert all(not p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("name", [n for n in METHOD_NAMES if METHODS.get(n).uses_ema])
def test_ema_moves_teacher_toward_student(name: str) -> None:
    from selfsup.nn.ema import update_ema

    method = build(name)
    student, teacher = method.ema_pairs()[0]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [(s - t).norm() for s, t in zip(student.parameters(), teacher.parameters())]
    update_ema(student, teacher, 0.9)
    after = [(s - t).norm() for s, t in zip(student.parameters(), teacher.parameters())]
    assert all(a < b or b == 0 for a, b in zip(after, before))


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_state_round_trips_through_state_dict(name: str) -> None:
    method = build(name)
    batch = make_batch(method)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    for step in range(2):  # fill queues / banks / centers so the state is not the initial one
        method.training_step(batch, info(step))["loss"].backward()
        opt.step()
        opt.zero_grad()
        method.on_step_end(info(step))
    state = copy.deepcopy(method.state_dict())
    fresh = build(name)
    fresh.load_state_dict(state)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_embed_shape_and_eval_mode(name: str) -> None:
    method = build(name).eval()
    feats = method.embed(torch.rand(5, 1, 16, 16))
    assert feats.shape == (5, method.num_features)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_fixed_batch_overfit_loss_falls(name: str) -> None:
    """A fixed batch of fixed views: 40 Adam steps must lower the loss clearly.

    ``on_step_end`` is not called: on a fixed batch it would fill MoCo's queue with the batch's
    own keys (each positive again as a negative), so the negatives stay fixed as well."""
    torch.manual_seed(0)
    method = build(name)
    batch = make_batch(method, batch_size=16)
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(40):
        out = method.training_step(batch, info(step, 40))
        losses.append(float(out["loss"].detach()))
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for student, teacher in method.ema_pairs():
                from selfsup.nn.ema import update_ema

                update_ema(student, teacher, 0.9)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_param_groups_exclude_norms_and_biases_from_decay() -> None:
    method = build("simclr")
    groups = {g["name"]: g for g in method.param_groups()}
    assert all(p.ndim > 1 for p in groups["decay"]["params"])
    assert groups["no_decay"]["weight_decay"] == 0.0
    n_params = sum(1 for p in method.parameters() if p.requires_grad)
    assert len(groups["decay"]["params"]) + len(groups["no_decay"]["params"]) == n_params


def test_moco_queue_updates_only_in_on_step_end() -> None:
    method = build("moco_v2")
    batch = make_batch(method)
    before = method.queue.queue.clone()
    method.training_step(batch, info())
    assert torch.equal(method.queue.queue, before), "forward must not touch the queue"
    method.on_step_end(info())
    assert not torch.equal(method.queue.queue, before)
