"""``bank_init="features"`` of the memory-bank methods (InstDisc, CMC): the epoch-0 pass fills
every bank row with its image's normalised embedding (against a float64 per-sample loop),
BatchNorm uses each pass batch's own statistics without touching the running ones, a resumed
run does not refill, two processes fill the same bank as one, the engine's hook runs it, and
bad values are one-line errors."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.data.base import TensorImageDataset
from selfsup.engine.evaluation import encode as engine_encode
from selfsup.engine.run import PretrainRun
from selfsup.errors import ConfigError
from selfsup.methods.base import Batch, EpochContext, StepInfo
from selfsup.methods.cmc import CMC
from selfsup.methods.instdisc import InstDisc, batch_statistics
from selfsup.registry import BACKBONES
from tests.conftest import tiny_config
from tests.multiprocess import assert_ranks_equal_one_process, results_on_ranks

N, SIDE, FEAT = 20, 4, 6
INFO = StepInfo(step=0, total_steps=10, epoch=0.0, lr=0.1)


class Flat(nn.Module):
    """A BatchNorm-free backbone ``(B, 1, 4, 4) -> (B, 5)``: per-sample features."""

    num_features = 5

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(SIDE * SIDE, self.num_features)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.fc(x.flatten(1)))


class WithBN(Flat):
    """``Flat`` followed by a BatchNorm1d: its features depend on the batch's statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(self.num_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(super().forward(x))


def images(n: int = N, seed: int = 1) -> Tensor:
    return torch.randn(n, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def context(x: Tensor, epoch: int = 0, batch_size: int = 8) -> EpochContext:
    """The loop's ``EpochContext`` over ``x``, encoding in batches as the engine does."""

    def encode(fn: Callable[[Tensor], Tensor]) -> Tensor:
        return torch.cat([fn(chunk) for chunk in x.split(batch_size)])

    return EpochContext(epoch=epoch, step=INFO, num_samples=x.shape[0], encode=encode)


def no_pass(epoch: int = 0) -> EpochContext:
    def encode(fn: Callable[[Tensor], Tensor]) -> Tensor:
        raise AssertionError("the bank was filled again")

    return EpochContext(epoch=epoch, step=INFO, num_samples=N, encode=encode)


def instdisc(backbone: nn.Module | None = None, **kwargs: Any) -> InstDisc:
    torch.manual_seed(0)
    options: dict[str, Any] = {"num_samples": N, "feat_dim": FEAT, "num_negatives": 7, "bank_init": "features"}
    return InstDisc(backbone if backbone is not None else Flat(), **(options | kwargs))


def cmc(**kwargs: Any) -> CMC:
    torch.manual_seed(0)
    backbone = BACKBONES.build("convnet", in_channels=1, image_size=SIDE, width=4, depth=1, norm="none")
    options: dict[str, Any] = {
        "backbone": backbone,
        "num_samples": N,
        "in_channels": 1,
        "image_size": SIDE,
        "mean": (0.0,),
        "std": (1.0,),
        "views": "halves",
        "feat_dim": FEAT,
        "num_negatives": 7,
        "bank_init": "features",
    }
    return CMC(**(options | kwargs))


def loop_embeddings(embed: Callable[[Tensor], Tensor], module: nn.Module, x: Tensor) -> Tensor:
    """``normalize(embed(x_i))`` for each image alone, in float64 on a copy of ``module``."""
    twin = copy.deepcopy(module).double().eval()
    rows = [F.normalize(embed(twin, x[i : i + 1].double()).double(), dim=1)[0] for i in range(x.shape[0])]
    return torch.stack(rows)


def instdisc_embed(m: nn.Module, x: Tensor) -> Tensor:
    return m.head(m.backbone(x))  # type: ignore[operator]


@pytest.mark.parametrize("objective", ["nce", "softmax"])
def test_instdisc_bank_rows_are_each_images_normalised_embedding(objective: str) -> None:
    method = instdisc(objective=objective)
    x = images()
    random_bank = method.bank.bank.clone()
    method.on_epoch_start(context(x))
    want = loop_embeddings(instdisc_embed, method, x)
    torch.testing.assert_close(method.bank.bank.double(), want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(method.bank.bank, random_bank)
    assert int(method.bank_filled) == 1 and method.training


def test_cmc_banks_hold_each_views_normalised_embedding() -> None:
    method = cmc()
    x = images()
    method.on_epoch_start(context(x))

    def view(k: int) -> Callable[[nn.Module, Tensor], Tensor]:
        def embed(m: nn.Module, xb: Tensor) -> Tensor:
            h = m.backbone.encode(xb)[k]  # type: ignore[operator]
            return (m.head1 if k == 0 else m.head2)(h)  # type: ignore[operator]

        return embed

    torch.testing.assert_close(method.bank1.bank.double(), loop_embeddings(view(0), method, x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(method.bank2.bank.double(), loop_embeddings(view(1), method, x), rtol=1e-5, atol=1e-6)


def test_batchnorm_uses_each_pass_batchs_statistics_and_keeps_its_running_ones() -> None:
    method = instdisc(WithBN())
    x = images()
    bn = method.backbone.bn
    running = [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]
    method.on_epoch_start(context(x, batch_size=8))
    # Per pass batch (8, 8, 4 images): BatchNorm over that batch alone, as in a training step.
    with torch.no_grad():
        h = torch.tanh(method.backbone.fc(x.flatten(1))).double().split(8)
        normed = torch.cat([(b - b.mean(0)) / torch.sqrt(b.var(0, unbiased=False) + bn.eps) for b in h])
        want = F.normalize(method.head.double()(normed * bn.weight.double() + bn.bias.double()), dim=1)
    torch.testing.assert_close(method.bank.bank.double(), want, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(running, [bn.running_mean, bn.running_var, bn.num_batches_tracked]))
    assert method.training and bn.training and "forward" not in vars(bn)
    with batch_statistics(method):  # a batch of one: running statistics (batch ones are undefined)
        one = method.backbone(x[:1])
    torch.testing.assert_close(one, bn.eval()(torch.tanh(method.backbone.fc(x[:1].flatten(1)))))


def test_resumed_run_and_later_epochs_do_not_refill() -> None:
    method = instdisc()
    x = images()
    method.on_epoch_start(context(x))
    method.on_epoch_start(no_pass(epoch=1))  # later epochs: no pass
    # A resumed run: a fresh method (random bank) loads the checkpoint's state, then the loop
    # calls the hook (at epoch 0 if it was saved there): the bank stays the checkpoint's.
    with torch.no_grad():
        method.bank.bank.mul_(-1.0)  # training moved the bank after the fill
    resumed = instdisc()
    resumed.load_state_dict(method.state_dict())
    resumed.on_epoch_start(no_pass(epoch=0))
    assert torch.equal(resumed.bank.bank, method.bank.bank)
    fresh = cmc()
    fresh.on_epoch_start(context(x))
    again = cmc()
    again.load_state_dict(fresh.state_dict())
    again.on_epoch_start(no_pass(epoch=0))
    assert torch.equal(again.bank1.bank, fresh.bank1.bank) and torch.equal(again.bank2.bank, fresh.bank2.bank)


def test_random_init_keeps_the_papers_state_and_skips_the_pass() -> None:
    method = instdisc(bank_init="random")
    before = method.bank.bank.clone()
    method.on_epoch_start(no_pass())
    assert torch.equal(method.bank.bank, before) and "bank_filled" not in method.state_dict()


def test_bad_bank_init_is_a_one_line_config_error() -> None:
    with pytest.raises(ConfigError, match="bank_init") as err:
        instdisc(bank_init="zeros")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="bank_init") as err:
        cmc(bank_init="ones")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="infonce") as err:
        cmc(objective="infonce")
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_pretrain_run_fills_the_bank_from_the_engines_pass(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "instdisc", "data.limit=96", "method.num_negatives=16", "method.bank_init=features")
    run = PretrainRun(cfg)
    original = run.method.on_epoch_start
    checked: list[int] = []

    def spy(ctx: EpochContext) -> None:
        original(ctx)
        if ctx.epoch == 0:
            method = run.method
            assert isinstance(method, InstDisc)
            with batch_statistics(method):
                want, _ = engine_encode(
                    method.embedding, run.parts.splits.pretrain, run.parts.eval_views, run.device, cfg.eval.batch_size
                )
            torch.testing.assert_close(method.bank.bank, F.normalize(want, dim=1))
            checked.append(ctx.epoch)

    run.method.on_epoch_start = spy  # type: ignore[method-assign]
    run.fit()
    assert checked == [0]


# ------------------------------------------------------------------------ two processes
WORLD, B = 2, 4


class _Views(nn.Module):
    def forward(self, x: Tensor) -> list[Tensor]:
        return [x]


def _ddp_fill(r: int | None, name: str) -> dict[str, Any]:
    """The epoch-0 fill through the engine's sharded, gathered pass, then one step and its
    bank update (rank ``r``'s share; ``None``: one process, everything)."""
    gen = torch.Generator().manual_seed(5)
    data = TensorImageDataset(torch.randint(0, 256, (N, 1, SIDE, SIDE), dtype=torch.uint8, generator=gen))
    # The exact softmax: no noise draws, which would differ between the process layouts.
    method: InstDisc | CMC = instdisc(objective="softmax") if name == "instdisc" else cmc(objective="softmax")

    def encode(fn: Callable[[Tensor], Tensor]) -> Tensor:
        return engine_encode(fn, data, _Views(), torch.device("cpu"), batch_size=3, gather=r is not None)[0]

    method.on_epoch_start(EpochContext(epoch=0, step=INFO, num_samples=N, encode=encode))
    banks = [method.bank.bank.clone()] if isinstance(method, InstDisc) else [method.bank1.bank, method.bank2.bank]
    filled = [bank.clone() for bank in banks]
    x = data.images[: WORLD * B].float() / 255
    index = torch.randperm(N, generator=gen)[: WORLD * B]
    share = slice(None) if r is None else slice(r * B, (r + 1) * B)
    out = method.training_step(Batch(views=[x[share]], index=index[share]), INFO)
    out["loss"].backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in method.parameters()]
    if r is not None:  # DDP's averaging of parameter gradients
        for g in grads:
            dist.all_reduce(g)
            g /= WORLD
    method.on_step_end(INFO, {k: v.detach() for k, v in out.items() if v.ndim > 0})
    banks = [method.bank.bank] if isinstance(method, InstDisc) else [method.bank1.bank, method.bank2.bank]
    return {"loss": out["loss"].detach(), "grads": grads, "filled": filled, "banks": [b.clone() for b in banks]}


def _ddp_instdisc(r: int | None) -> dict[str, Any]:
    return _ddp_fill(r, "instdisc")


def _ddp_cmc(r: int | None) -> dict[str, Any]:
    return _ddp_fill(r, "cmc")


@pytest.mark.slow
@pytest.mark.parametrize("fn", [_ddp_instdisc, _ddp_cmc], ids=["instdisc", "cmc"])
def test_two_processes_fill_the_same_bank_as_one(tmp_path: Path, fn: Callable[[int | None], dict[str, Any]]) -> None:
    ranks = results_on_ranks(fn, WORLD, tmp_path)
    ref = fn(None)
    assert_ranks_equal_one_process(ranks, ref, state_keys=("filled", "banks"))
    assert all(torch.equal(a, b) for out in ranks for a, b in zip(out["filled"], ranks[0]["filled"]))
