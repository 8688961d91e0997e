"""The training step without host syncs (the GPU path, forced on the CPU with ``sync_free=True``),
its device-side skip of a non-finite step, the deferred NaN check, ``train.precision=auto`` and
``train.compile``."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from selfsup.config import OptimConfig
from selfsup.engine.loop import (
    DataBatch,
    LoopSchedule,
    NonFiniteLossError,
    StepParts,
    TrainingLoop,
    choose_cpu_precision,
    masked_ema,
    resolve_precision,
)
from selfsup.engine.optim import build_optimizer
from selfsup.engine.run import PretrainRun
from selfsup.methods.base import Batch, Method, StepInfo
from selfsup.nn.ema import update_ema
from selfsup.registry import BACKBONES, METHODS, VIEW_RECIPES
from tests.conftest import tiny_config

SMALL: dict[str, dict[str, Any]] = {
    "simclr": {"proj_hidden_dim": 16, "proj_dim": 8},
    "byol": {"proj_hidden_dim": 16, "proj_dim": 8, "pred_hidden_dim": 16},
    "moco_v2": {"proj_hidden_dim": 16, "proj_dim": 8, "num_samples": 64, "batch_size": 8, "queue_size": 32},
}


#: Methods whose own step still reads the device (outside the loop), and where.
@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Every Python-level way of reading a tensor on the host raises inside the block."""
    names = ("item", "__bool__", "__float__", "__int__", "tolist", "cpu")

    def refuse(name: str) -> Any:
        def method(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"host sync: Tensor.{name}")

        return method

    saved = {name: getattr(Tensor, name) for name in names}
    try:
        for name in names:
            setattr(Tensor, name, refuse(name))
        yield
    finally:
        for name, value in saved.items():
            setattr(Tensor, name, value)


def _optimizer(method: Method, kind: str) -> torch.optim.Optimizer:
    if kind == "adamw_fused":  # what build_optimizer gives on a GPU
        return torch.optim.AdamW(method.param_groups(), lr=1e-2, weight_decay=0.05, fused=True)
    if kind == "sgd_fused":
        return torch.optim.SGD(method.param_groups(), lr=1e-2, momentum=0.9, weight_decay=0.05, fused=True)
    name = "adamw" if kind == "adamw" else kind
    return build_optimizer(method.param_groups(), OptimConfig(name=name, weight_decay=0.05), lr=1e-2)


def _loop(
    name: str, optimizer: str = "adamw_fused", *, sync_free: bool = True, clip_grad: float = 0.0, compile: bool = False
) -> TrainingLoop:
    torch.manual_seed(0)
    backbone = BACKBONES.build("convnet", in_channels=1, image_size=8, width=8)
    method = METHODS.build(name, backbone=backbone, **SMALL[name])
    method.train()
    schedule = LoopSchedule(total_steps=8, steps_per_epoch=4, peak_lr=1e-2, ema_momentum=(0.9, 0.99))
    return TrainingLoop(
        method,
        _optimizer(method, optimizer),
        schedule,
        _device_views,
        torch.device("cpu"),
        sync_free=sync_free,
        clip_grad=clip_grad,
        compile=compile,
    )


def _device_views(x: Tensor) -> list[Tensor]:
    """Two views made on the device only. (The view recipes draw some of their random choices
    on the host, e.g. ``torch.randperm(4).tolist()``: no device sync on a GPU, but the guard
    below cannot tell a host tensor from a device one on the CPU.)"""
    x = (x - 0.5) / 0.25
    return [x, (x + 0.1 * torch.randn_like(x)).flip(-1)]


def _data(step: int) -> DataBatch:
    g = torch.Generator().manual_seed(step)
    return DataBatch(images=torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8, generator=g), index=torch.arange(8))


def _poison(method: Method, steps: set[int]) -> None:
    """NaN inputs at ``steps``: the forward itself goes non-finite (BatchNorm statistics too)."""
    original = method.training_step

    def poisoned(batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        if step.step in steps:
            batch.views[0] = batch.views[0] * math.nan
        return original(batch, step)

    method.training_step = poisoned  # type: ignore[method-assign]


def _state(loop: TrainingLoop) -> dict[str, Tensor]:
    """Every tensor a step may change: parameters, buffers (teachers, queues, BN statistics)
    and the optimiser state."""
    out = {f"method.{k}": v.detach().clone() for k, v in loop.method.state_dict().items()}
    for i, state in enumerate(loop.optimizer.state.values()):
        out.update({f"optim.{i}.{k}": v.clone() for k, v in state.items() if isinstance(v, Tensor)})
    return out


def _bit_equal(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool((a.view(-1).view(torch.uint8) == b.view(-1).view(torch.uint8)).all())


# ---------------------------------------------------------------------------- no sync
@pytest.mark.parametrize(
    ("name", "optimizer", "clip"),
    [
        ("simclr", "adamw_fused", 0.0),
        ("byol", "adamw_fused", 1.0),
        ("byol", "sgd", 0.0),
        ("byol", "lars", 0.0),
        ("moco_v2", "sgd", 0.0),  # queue enqueue: the write position stays on the device
    ],
)
def test_the_device_path_step_never_reads_a_tensor_on_the_host(name: str, optimizer: str, clip: float) -> None:
    loop = _loop(name, optimizer, clip_grad=clip)
    with no_host_sync():
        steps = [loop.step(_data(step), loop.step_info(step)) for step in range(3)]
    loop.check_finite()  # one read of all three flags, outside the guarded block
    assert all(math.isfinite(parts["loss"]) for parts in steps)
    assert ("grad_norm" in steps[0]) == (clip > 0)
    assert isinstance(steps[0].raw["loss"], Tensor)


def test_the_guard_does_catch_a_sync() -> None:
    loop = _loop("simclr", sync_free=False)  # the CPU path reads the flag at once
    with no_host_sync(), pytest.raises(AssertionError, match="host sync"):
        loop.step(_data(0), loop.step_info(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_sync_on_cuda() -> None:  # pragma: no cover - no GPU in CI
    torch.manual_seed(0)
    device = torch.device("cuda")
    backbone = BACKBONES.build("convnet", in_channels=1, image_size=8, width=8)
    method = METHODS.build("byol", backbone=backbone, **SMALL["byol"]).to(device)
    views = VIEW_RECIPES.build(method.view_recipe, image_size=8, in_channels=1, mean=(0.5,), std=(0.25,))
    optimizer = build_optimizer(method.param_groups(), OptimConfig(name="adamw"), lr=1e-3)
    loop = TrainingLoop(method, optimizer, LoopSchedule(8, 4, 1e-3), views, device, clip_grad=1.0)
    assert loop.sync_free
    batches = [_data(step) for step in range(3)]
    for data in batches:
        data.images, data.index = data.images.pin_memory(), data.index.to(device)
    loop.step(batches[0], loop.step_info(0))  # warm-up: lazy optimiser state, cuDNN choices
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in (1, 2):
            loop.step(batches[step], loop.step_info(step))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    loop.check_finite()


# ---------------------------------------------------------------------------- skipped on the device
@pytest.mark.parametrize(
    ("name", "optimizer"),
    [
        ("byol", "adamw_fused"),
        ("byol", "adamw"),
        ("byol", "sgd_fused"),
        ("moco_v2", "sgd"),
        ("moco_v2", "lars"),
        ("simclr", "adamw_fused"),
    ],
)
def test_a_non_finite_step_changes_nothing_and_is_raised_at_the_next_check(name: str, optimizer: str) -> None:
    loop = _loop(name, optimizer, clip_grad=1.0)
    _poison(loop.method, {1})
    loop.step(_data(0), loop.step_info(0))
    before = _state(loop)
    # Non-fused Adam reads its step count with .item(): a host tensor on a GPU run, no sync,
    # but the guard cannot tell on the CPU.
    guard = optimizer != "adamw"
    with no_host_sync() if guard else contextlib.nullcontext():
        bad = loop.step(_data(1), loop.step_info(1))
    after = _state(loop)
    assert sorted(after) == sorted(before)
    changed = [k for k in before if not _bit_equal(before[k], after[k])]
    assert not changed, changed
    with pytest.raises(NonFiniteLossError, match="step 1: loss=nan") as err:
        loop.check_finite()
    assert err.value.step == 1 and math.isnan(err.value.parts["loss"]) and math.isnan(bad["loss"])
    good = loop.step(_data(2), loop.step_info(2))  # training goes on from the untouched state
    loop.check_finite()
    assert math.isfinite(good["loss"])
    assert any(not _bit_equal(after[k], v) for k, v in _state(loop).items())


def test_a_skipped_first_step_leaves_the_fallback_optimiser_as_new() -> None:
    """SGD builds its momentum from the first gradient: a skipped first step must not keep a
    NaN one (the restored state is zero, the same next update as no state)."""
    skipped, fresh = _loop("byol", "sgd"), _loop("byol", "sgd")
    _poison(skipped.method, {0})
    skipped.step(_data(0), skipped.step_info(0))
    for loop in (skipped, fresh):
        torch.manual_seed(5)  # the same augmentation noise for both
        loop.step(_data(1), loop.step_info(1))
    for (k, a), b in zip(skipped.method.state_dict().items(), fresh.method.state_dict().values()):
        if k.endswith("num_batches_tracked"):
            continue
        torch.testing.assert_close(a, b, msg=k)


def test_run_raises_for_the_first_bad_step_at_the_check_interval() -> None:
    loop = _loop("simclr")
    _poison(loop.method, {1, 2})
    seen: list[int] = []
    batches = iter([_data(step) for step in range(8)])
    with pytest.raises(NonFiniteLossError, match="step 1") as err:
        loop.run(batches, on_step=lambda info, parts, n: seen.append(info.step), check_every=3)
    assert err.value.step == 1
    assert seen == [0, 1], "checked after step 2, before its on_step"


def test_the_cpu_path_raises_at_the_step_itself() -> None:
    loop = _loop("byol", sync_free=False)
    _poison(loop.method, {1})
    loop.step(_data(0), loop.step_info(0))
    with pytest.raises(NonFiniteLossError, match="step 1"):
        loop.step(_data(1), loop.step_info(1))
    assert not loop.sync_free and TrainingLoop.__init__.__kwdefaults__["sync_free"] is None


def test_step_parts_read_every_part_once() -> None:
    parts = StepParts(3, {"loss": torch.tensor(1.5), "acc": 0.25}, torch.tensor(True))
    assert len(parts) == 2 and set(parts) == {"loss", "acc"}
    assert dict(parts) == {"loss": 1.5, "acc": 0.25} and parts.floats() is parts.floats()


def test_masked_ema_is_update_ema_when_finite_and_nothing_otherwise() -> None:
    torch.manual_seed(0)
    student, teacher = (
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)),
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)),
    )
    reference = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    reference.load_state_dict(teacher.state_dict())
    kept = {k: v.clone() for k, v in teacher.named_parameters()}
    masked_ema(student, teacher, 0.9, torch.tensor(False))
    assert all(torch.equal(v, kept[k]) for k, v in teacher.named_parameters())
    masked_ema(student, teacher, 0.9, torch.tensor(True))
    update_ema(student, reference, 0.9)
    for a, b in zip(teacher.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_a_run_on_the_device_path_raises_the_first_bad_step_at_the_log_interval(tmp_path: Path) -> None:
    trainer = PretrainRun(tiny_config(tmp_path, "simclr", "train.max_steps=8", "train.log_every=5"))
    trainer.loop.sync_free = True  # as on a GPU
    _poison(trainer.method, {2})
    with pytest.raises(NonFiniteLossError, match="step 2") as err:
        trainer.fit()
    assert err.value.step == 2 and "No checkpoint was written" in str(err.value)
    assert not (trainer.run_dir / "metrics.jsonl").read_text().strip(), "nothing logged before the check"


# ---------------------------------------------------------------------------- precision
def test_auto_precision_is_fp32_without_native_bf16_units() -> None:
    def never() -> tuple[float, float]:
        raise AssertionError("no timing without the units")

    assert choose_cpu_precision(frozenset({"avx2", "avx512f"}), never) == "fp32"
    assert choose_cpu_precision(frozenset({"amx_bf16"}), lambda: (1.0, 0.5)) == "bf16"
    assert choose_cpu_precision(frozenset({"avx512_bf16"}), lambda: (1.0, 0.95)) == "fp32", "within the 10% margin"


def test_auto_precision_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    import selfsup.engine.loop as loop_module

    monkeypatch.setattr(loop_module, "cpu_flags", lambda: frozenset({"sse4_2"}))
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(loop_module, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    monkeypatch.setattr(loop_module, "time_bf16_on_cpu", lambda: (2.0, 1.0))
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", torch.device("cuda")) == "fp32"
    with pytest.raises(ValueError, match="'fp32', 'bf16' or 'auto'"):
        resolve_precision("fp16", torch.device("cpu"))


def test_a_run_records_the_resolved_precision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import selfsup.engine.loop as loop_module

    monkeypatch.setattr(loop_module, "cpu_flags", lambda: frozenset({"sse4_2"}))
    trainer = PretrainRun(tiny_config(tmp_path, "simclr", "train.max_steps=1", "train.precision=auto"))
    trainer.fit()
    assert trainer.loop.precision == "fp32"
    assert json.loads((trainer.run_dir / "resolved.json").read_text())["precision"] == "fp32"
    assert json.loads((trainer.run_dir / "run_info.json").read_text())["precision"] == "fp32"


def test_time_bf16_on_cpu_measures_both() -> None:
    from selfsup.engine.loop import time_bf16_on_cpu

    state = torch.get_rng_state()
    fp32_s, bf16_s = time_bf16_on_cpu(repeats=1)
    assert 0 < fp32_s < 5 and 0 < bf16_s < 5
    assert torch.equal(torch.get_rng_state(), state), "the run's random stream is left as it was"


# ---------------------------------------------------------------------------- compile
@pytest.mark.slow
def test_compiled_forward_trains_like_the_eager_one() -> None:
    eager = _loop("simclr", "adamw", sync_free=False)
    compiled = _loop("simclr", "adamw", sync_free=False, compile=True)
    for step in range(3):  # the lr and other StepInfo numbers change every step: no recompile
        torch.manual_seed(step)
        a = eager.step(_data(step), eager.step_info(step))["loss"]
        torch.manual_seed(step)
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            b = compiled.step(_data(step), compiled.step_info(step))["loss"]
        assert b == pytest.approx(a, rel=1e-3, abs=1e-4), step
