"""Output layers held fixed early in training (DINO, iBOT and DINOv2's last head layers in the
first epoch, SwAV's prototypes in the first steps) get no weight gradient from the forward
(``selfsup.nn.heads.maybe_frozen_linear``) and no update, through the real training loop;
after the frozen span they get both. Under two processes (DDP) the gradient is computed, so
DDP's reducer does not fail."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from selfsup.engine.loop import DataBatch, LoopSchedule, TrainingLoop
from selfsup.methods.base import Method, StepInfo
from selfsup.methods.dino import DINOHead
from selfsup.nn.heads import maybe_frozen_linear
from selfsup.registry import BACKBONES, METHODS, VIEW_RECIPES

HEAD = {"proj_hidden_dim": 32, "proj_dim": 16, "out_dim": 32}
STEPS_PER_EPOCH = 2
CASES: dict[str, dict[str, Any]] = {
    "dino": {**HEAD, "freeze_last_layer_epochs": 1.0},
    "ibot": {**HEAD, "patch_out_dim": 24, "shared_head": False, "freeze_last_layer_epochs": 1.0},
    "dinov2": {**HEAD, "patch_out_dim": 24, "freeze_last_layer_epochs": 1.0},
    "swav": {"proj_hidden_dim": 32, "proj_dim": 16, "num_prototypes": 8, "freeze_prototypes_steps": STEPS_PER_EPOCH},
}


def _method(name: str) -> Method:
    torch.manual_seed(0)
    if name in ("ibot", "dinov2"):
        backbone = BACKBONES.build(
            "vit_tiny", in_channels=1, image_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2
        )
    else:
        backbone = BACKBONES.build("convnet", in_channels=1, image_size=16, width=8)
    options = dict(CASES[name])
    if name == "dinov2":
        options["drop_path_rate"] = 0.0
    return METHODS.build(name, backbone=backbone, num_global_crops=2, **options)


def _frozen_parameters(method: Method) -> list[nn.Parameter]:
    heads = [getattr(method, "head", None), getattr(method, "patch_head", None)]
    if hasattr(method, "prototypes"):
        return [method.prototypes.weight]
    return [p for head in heads if head is not None for p in head.last_layer_parameters() if p.requires_grad]


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_frozen_layer_gets_no_gradient_and_no_update_until_its_span_ends(name: str) -> None:
    method = _method(name).train()
    frozen = _frozen_parameters(method)
    assert frozen
    views = VIEW_RECIPES.build(
        "multi_crop", image_size=16, in_channels=1, mean=(0.5,), std=(0.25,), num_local=2, local_size=8
    )
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    schedule = LoopSchedule(total_steps=4, steps_per_epoch=STEPS_PER_EPOCH, peak_lr=1e-2)
    loop = TrainingLoop(method, optimizer, schedule, views, torch.device("cpu"))
    had_gradient: list[bool] = []
    clear = method.on_after_backward

    def record(step: StepInfo) -> None:  # what the forward and backward gave, before any clearing
        had_gradient.append(all(p.grad is not None for p in frozen))
        clear(step)

    method.on_after_backward = record
    moved: list[bool] = []
    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for step in range(4):
        before = [p.detach().clone() for p in frozen]
        loop.step(DataBatch(images=images, index=torch.arange(8)), loop.step_info(step))
        # (SwAV re-normalises its unit-norm prototypes every step: last-bit changes, no update.)
        moved.append(all(not torch.allclose(p, b, rtol=0, atol=1e-6) for p, b in zip(frozen, before)))
        if step < STEPS_PER_EPOCH:
            assert all(p.grad is None for p in frozen)
    assert had_gradient == [False, False, True, True]
    assert moved == [False, False, True, True]


def test_maybe_frozen_linear_gives_the_same_outputs_and_input_gradients() -> None:
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    outputs: list[Tensor] = []
    grads: list[Tensor] = []
    for frozen in (False, True):
        out = maybe_frozen_linear(x, lambda: 2 * weight, frozen)
        (out.square().sum()).backward()
        assert x.grad is not None
        outputs.append(out.detach())
        grads.append(x.grad.clone())
        assert (weight.grad is None) == frozen
        x.grad, weight.grad = None, None
    torch.testing.assert_close(outputs[0], x.detach() @ (2 * weight.detach()).T)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(grads[0], grads[1])


def _ddp_worker(rank: int, port: int, errors: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        head = DINOHead(8, 16, 16, 8)
        ddp = nn.parallel.DistributedDataParallel(head)
        for frozen in (True, True, False):
            ddp(torch.randn(4, 8), freeze_last_layer=frozen).square().mean().backward()
            head.zero_grad(set_to_none=True)
    except Exception as err:  # reported to the parent process
        errors.put(f"rank {rank}: {str(err).splitlines()[0]}")
    finally:
        dist.destroy_process_group()


def test_a_frozen_layer_under_ddp_still_reduces() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawn, not fork: a child forked after torch's OpenMP threads ran can hang in its first
    # parallel region (seen in a full-suite run).
    errors = mp.get_context("spawn").Queue()
    mp.start_processes(_ddp_worker, args=(port, errors), nprocs=2, start_method="spawn")
    assert errors.empty(), errors.get()
