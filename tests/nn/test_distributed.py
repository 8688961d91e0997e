"""World size 2 with batch B must equal one process with batch 2B (gloo, two CPU processes).

One spawn runs every check and saves its results; the parent compares them with the
single-process computation on the concatenated inputs. Gradient convention checked here
(see ``selfsup.nn.distributed``): DDP's averaged parameter gradients equal the
single-process gradient of the mean loss, and the raw gradient a rank sees on its own
inputs is ``world_size`` times the single-process gradient of its slice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from selfsup.losses import (
    barlow_twins_loss,
    clip_loss,
    dino_center_update,
    info_nce,
    moco_v3_loss,
    nt_xent,
)
from selfsup.nn import distributed as sd
from selfsup.nn.memory import FIFOQueue, IndexMemoryBank
from selfsup.nn.sinkhorn import sinkhorn_knopp
from tests.multiprocess import results_on_ranks

WORLD = 2
B = 3  # per-process batch
D_IN, D = 5, 4
K = 6

_LOGIT_SCALE = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)

# name -> (number of (2B, D_IN) inputs, loss over the projected inputs)
CASES: dict[str, tuple[int, Callable[..., Tensor]]] = {
    "nt_xent": (2, lambda a, b, gather: nt_xent(a, b, 0.5, gather=gather)),
    "info_nce": (2, lambda q, k, gather: info_nce(q, k, None, 0.2, gather=gather)),
    "moco_v3": (4, lambda q1, q2, k1, k2, gather: moco_v3_loss(q1, q2, k1, k2, 0.2, gather=gather)),
    "clip": (2, lambda i, t, gather: clip_loss(i, t, _LOGIT_SCALE, gather=gather)),
    "barlow_twins": (2, lambda a, b, gather: barlow_twins_loss(a, b, 0.1, gather=gather)),
}


def _data() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1234)
    n = WORLD * B

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return {
        "inputs": {name: [randn(n, D_IN) for _ in range(k)] for name, (k, _) in CASES.items()},
        "gather_x": randn(n, D),
        "scores": torch.rand(n, K, generator=g, dtype=torch.float64) * 2 - 1,
        "keys": [randn(n, D), randn(n, D)],
        "bank_index": torch.randperm(10, generator=g)[:n],
        "bank_feats": randn(n, D),
        "teacher_out": randn(8, K),  # split 3 / 5 between the ranks: unequal on purpose
    }


def _model() -> nn.Linear:
    torch.manual_seed(99)
    return nn.Linear(D_IN, D).double()


def _local(x: Tensor, r: int) -> Tensor:
    return x[r * B : (r + 1) * B]


def _run_case(name: str, inputs: list[Tensor], r: int | None) -> dict[str, Any]:
    """One forward/backward; distributed (gather=True, DDP averaging) when ``r`` is given."""
    _, fn = CASES[name]
    model = _model()
    if r is not None:
        inputs = [_local(x, r) for x in inputs]
    xs = [x.clone().requires_grad_(True) for x in inputs]
    z = model(torch.cat(xs)).split(xs[0].shape[0])
    loss = fn(*z, gather=r is not None)
    loss.backward()
    if r is not None:
        # What DDP does to parameter gradients after backward: the mean over ranks. Done by
        # hand because constructing DDP imports torch._dynamo, seconds on a shared CPU.
        for p in model.parameters():
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= WORLD
    return {
        "loss": loss.detach(),
        "param_grads": [p.grad.clone() for p in model.parameters()],
        "input_grads": [x.grad.clone() for x in xs],
    }


def _checks(r: int) -> dict[str, Any]:
    data = _data()
    out: dict[str, Any] = {
        "is_dist": sd.is_dist(),
        "world_size": sd.world_size(),
        "rank": sd.rank(),
        "is_main": sd.is_main_process(),
    }
    x = _local(data["gather_x"], r).clone().requires_grad_(True)
    out["concat_all_gather"] = sd.concat_all_gather(x)
    out["concat_requires_grad"] = out["concat_all_gather"].requires_grad
    gathered = sd.gather_with_grad(x)
    # rank r weighs the gathered batch by (r + 1): x's grad must sum those weights over ranks
    (gathered * (r + 1)).sum().backward()
    out["gather_grad"] = x.grad.clone()
    out["gathered"] = gathered.detach()
    y = torch.full((2,), float(r + 1), dtype=torch.float64, requires_grad=True)
    (sd.all_reduce_sum(y).sum() + sd.all_reduce_mean(y).sum()).backward()
    yd = y.detach()
    out["all_reduce"] = (sd.all_reduce_sum(yd), sd.all_reduce_mean(yd), y.grad.clone())

    out["cases"] = {name: _run_case(name, data["inputs"][name], r) for name in CASES}

    out["codes"] = sinkhorn_knopp(_local(data["scores"], r), epsilon=0.05, iterations=3)

    queue = FIFOQueue(5, D, generator=torch.Generator().manual_seed(7))
    for keys in data["keys"]:
        queue.enqueue(_local(keys, r))
    out["queue"] = {k: v.clone() for k, v in queue.state_dict().items()}

    bank = IndexMemoryBank(10, D, generator=torch.Generator().manual_seed(8))
    bank.update(_local(data["bank_index"], r), _local(data["bank_feats"], r), momentum=0.5)
    out["bank"] = bank.bank.clone()

    t = data["teacher_out"]
    local_t = t[:3] if r == 0 else t[3:]
    zero = torch.zeros(1, K, dtype=torch.float64)
    out["center"] = dino_center_update(zero, local_t, momentum=0.9)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("dist")
    return results_on_ranks(_checks, WORLD, tmp)


def test_single_process_helpers_are_noops() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert not sd.is_dist() and sd.world_size() == 1 and sd.rank() == 0 and sd.is_main_process()
    assert sd.gather_with_grad(x) is x
    assert sd.all_reduce_sum(x) is x and sd.all_reduce_mean(x) is x
    gathered = sd.concat_all_gather(x)
    assert torch.equal(gathered, x) and not gathered.requires_grad


def test_rank_helpers_and_collectives(ranks: list[dict[str, Any]]) -> None:
    data = _data()
    for r, out in enumerate(ranks):
        assert out["is_dist"] and out["world_size"] == WORLD and out["rank"] == r
        assert out["is_main"] == (r == 0)
        assert torch.equal(out["concat_all_gather"], data["gather_x"])
        assert not out["concat_requires_grad"]
        assert torch.equal(out["gathered"], data["gather_x"])
        # sum over ranks of the weights (r + 1): 1 + 2
        assert torch.equal(out["gather_grad"], torch.full((B, D), 3.0, dtype=torch.float64))
        s, m, g = out["all_reduce"]
        assert torch.equal(s, torch.full((2,), 3.0, dtype=torch.float64))
        assert torch.equal(m, torch.full((2,), 1.5, dtype=torch.float64))
        # d/dy_r of sum_r' [sum(all_reduce_sum) + sum(all_reduce_mean)] = W * (1 + 1/W)
        assert torch.equal(g, torch.full((2,), WORLD + 1.0, dtype=torch.float64))


@pytest.mark.parametrize("name", list(CASES))
def test_gathered_loss_equals_single_process_global_batch(ranks: list[dict[str, Any]], name: str) -> None:
    ref = _run_case(name, _data()["inputs"][name], None)
    got = [out["cases"][name] for out in ranks]
    mean_loss = sum(g["loss"] for g in got) / WORLD
    torch.testing.assert_close(mean_loss, ref["loss"], rtol=1e-6, atol=1e-6)
    for r, g in enumerate(got):
        # DDP-averaged parameter gradients: identical to one process with 2B samples
        for p_got, p_ref in zip(g["param_grads"], ref["param_grads"]):
            torch.testing.assert_close(p_got, p_ref, rtol=1e-6, atol=1e-6)
        # a rank's own inputs carry the gradient of the rank-summed loss: W times the slice
        for x_got, x_ref in zip(g["input_grads"], ref["input_grads"]):
            torch.testing.assert_close(x_got / WORLD, _local(x_ref, r), rtol=1e-6, atol=1e-6)


def test_sinkhorn_over_ranks_equals_single_process(ranks: list[dict[str, Any]]) -> None:
    ref = sinkhorn_knopp(_data()["scores"], epsilon=0.05, iterations=3)
    got = torch.cat([out["codes"] for out in ranks])
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)


def test_queue_identical_on_ranks_and_equal_to_single_process(ranks: list[dict[str, Any]]) -> None:
    queue = FIFOQueue(5, D, generator=torch.Generator().manual_seed(7))
    for keys in _data()["keys"]:
        queue.enqueue(keys)
    for out in ranks:
        for k, v in queue.state_dict().items():
            assert torch.equal(out["queue"][k], v), k


def test_bank_identical_on_ranks_and_equal_to_single_process(ranks: list[dict[str, Any]]) -> None:
    data = _data()
    bank = IndexMemoryBank(10, D, generator=torch.Generator().manual_seed(8))
    bank.update(data["bank_index"], data["bank_feats"], momentum=0.5)
    for out in ranks:
        assert torch.equal(out["bank"], bank.bank)


def test_dino_center_uses_global_batch_mean(ranks: list[dict[str, Any]]) -> None:
    t = _data()["teacher_out"]
    ref = dino_center_update(torch.zeros(1, K, dtype=torch.float64), t, momentum=0.9)
    for out in ranks:
        torch.testing.assert_close(out["center"], ref, rtol=1e-12, atol=1e-12)
