"""benchmarks/throughput.py: round statistics, FLOP ceilings, settings and one tiny measurement."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import Tensor, nn

from selfsup.engine.loop import DataBatch, LoopSchedule, TrainingLoop
from selfsup.methods.base import Batch, Method, StepInfo
from selfsup.registry import BACKBONES

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "throughput.py"


def _load() -> ModuleType:
    # benchmarks/ is not a package: load the script as a module (registered, for dataclasses).
    name = "_throughput_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


tp = _load()


# --------------------------------------------------------------------------- statistics


def test_summarize_rounds_medians_ratio_and_spread() -> None:
    stats = tp.summarize_rounds([100.0, 90.0, 110.0], [200.0, 200.0, 200.0])
    assert stats.method_ips == 100.0
    assert stats.backbone_ips == 200.0
    assert stats.ratios == pytest.approx((0.5, 0.45, 0.55))
    assert stats.ratio == pytest.approx(0.5)
    assert stats.spread == pytest.approx((0.55 - 0.45) / 0.5)  # 0.2
    assert stats.inconclusive(0.15)
    assert not stats.inconclusive(0.25)


def test_ratio_is_median_of_per_round_ratios_not_ratio_of_medians() -> None:
    # Rounds where the machine slowed both sides: each round's ratio is 0.5, medians of the
    # img/s columns alone would pair different rounds.
    stats = tp.summarize_rounds([100.0, 50.0, 25.0, 10.0], [200.0, 100.0, 50.0, 20.0])
    assert stats.ratio == pytest.approx(0.5)
    assert stats.spread == pytest.approx(0.0)
    assert stats.method_ips == pytest.approx(37.5)  # even count: mean of the middle two
    assert not stats.inconclusive(0.15)


def test_inconclusive_decision() -> None:
    assert not tp.is_inconclusive(0.15, 0.15)  # at the threshold: still conclusive
    assert tp.is_inconclusive(0.1500001, 0.15)
    assert tp.is_inconclusive(math.nan, 0.15)
    assert tp.is_inconclusive(math.inf, 0.15)
    assert tp.summarize_rounds([1.0], [2.0]).spread == 0.0
    with pytest.raises(ValueError, match="round counts"):
        tp.summarize_rounds([1.0, 2.0], [1.0])


# --------------------------------------------------------------------------- FLOP ceiling


class _BackboneOnly(Method):
    """A "method" that is the bare step: the backbone on each view ``passes`` times."""

    def __init__(self, backbone: nn.Module, passes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.passes = passes

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        losses = [self.backbone(v).float().pow(2).mean() for v in batch.views for _ in range(self.passes)]
        return {"loss": torch.stack(losses).sum()}


def _two_views(x: Tensor) -> list[Tensor]:
    return [x, x.flip(-1)]


def _tiny_loop(passes: int) -> tuple[TrainingLoop, DataBatch]:
    backbone = BACKBONES.get("convnet")(in_channels=1, image_size=8, width=8)
    method = _BackboneOnly(backbone, passes)
    schedule = LoopSchedule(total_steps=10, steps_per_epoch=10, peak_lr=0.0)
    loop = TrainingLoop(method, torch.optim.SGD(method.parameters(), lr=0.0), schedule, _two_views, torch.device("cpu"))
    images = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return loop, DataBatch(images=images, index=torch.arange(8))


@pytest.mark.parametrize(("passes", "ceiling"), [(1, 1.0), (2, 0.5)])
def test_flop_ceiling_of_backbone_only_methods(passes: int, ceiling: float) -> None:
    loop, data = _tiny_loop(passes)
    method_flops = tp.count_flops(lambda: loop.step(data, loop.step_info(0)))
    backbone_flops = tp.count_flops(tp.bare_backbone_step(loop, data))
    assert backbone_flops > 0
    assert tp.flop_ceiling(backbone_flops, method_flops) == pytest.approx(ceiling, rel=1e-6)


def test_measure_loop_of_the_bare_method_has_ceiling_one() -> None:
    loop, data = _tiny_loop(1)
    result = tp.measure_loop(loop, data, rounds=2, steps=1, warmup=0)
    assert result["ceiling"] == pytest.approx(1.0)
    assert result["views"] == 2
    assert len(result["ratios"]) == 2
    assert "on_step_end" not in vars(loop.method)  # the timing wrapper is removed again


def test_cpu_attention_is_counted() -> None:
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    vit = BACKBONES.get("vit_tiny")(in_channels=1, image_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2)
    x = torch.randn(2, 1, 8, 8)
    with FlopCounterMode(display=False) as plain:  # torch alone: no formula for the CPU kernel
        vit(x).sum().backward()
    counted = tp.count_flops(lambda: vit(x).sum().backward())
    shape = (2, 2, 5, 8)  # (B, heads, 1 + 4 patches, head dim)
    attention = sdpa_flop_count(shape, shape, shape) + sdpa_backward_flop_count(shape, shape, shape, shape)
    assert counted - plain.get_total_flops() == attention > 0


# --------------------------------------------------------------------------- settings


def test_defaults_follow_the_backbone() -> None:
    conv = tp.resolve_setup(tp.parse_args([]), "simclr")
    assert conv.cfg.backbone == {"name": "convnet", "width": 32}
    assert (conv.channels, conv.image_size) == (1, 28)
    resnet = tp.resolve_setup(tp.parse_args(["--backbone", "resnet18"]), "simclr")
    assert resnet.cfg.backbone == {"name": "resnet18", "width": 1.0, "stem": "cifar"}
    assert (resnet.channels, resnet.image_size) == (3, 32)
    vit = tp.resolve_setup(tp.parse_args(["--backbone", "vit_tiny", "--image-size", "28"]), "mae")
    assert vit.cfg.backbone["patch_size"] == 4 and 28 % vit.cfg.backbone["patch_size"] == 0
    merged = tp.resolve_setup(tp.parse_args(["--backbone", "resnet18", "--backbone-options", '{"width": 0.5}']), "byol")
    assert merged.cfg.backbone == {"name": "resnet18", "width": 0.5, "stem": "cifar"}


def test_config_file_then_flags() -> None:
    config = str(SCRIPT.parents[1] / "configs" / "simclr" / "fashion_mnist.yaml")
    args = tp.parse_args(["--config", config, "--batch-size", "8", "--set", "method.temperature=0.2"])
    setup = tp.resolve_setup(args, "simclr")
    assert setup.cfg.backbone == {"name": "convnet", "width": 32, "out_grid": 2}
    assert (setup.channels, setup.image_size) == (1, 28)
    assert setup.cfg.train.batch_size == 8
    assert setup.cfg.method["proj_hidden_dim"] == 512
    assert setup.cfg.method["temperature"] == 0.2
    assert setup.cfg.views["crop_scale"] == [0.7, 1.0]
    other = tp.resolve_setup(args, "byol")  # another method: its own defaults, a note says so
    assert "proj_hidden_dim" not in other.cfg.method and other.note


def test_child_argv_drops_the_method_list() -> None:
    argv = ["--methods", "simclr", "byol", "--steps", "3", "--set", "method.x=1"]
    assert tp._child_argv(argv) == ["--steps", "3", "--set", "method.x=1"]


# --------------------------------------------------------------------------- smoke


def test_measure_simclr_smoke() -> None:
    args = tp.parse_args(
        [
            "--method", "simclr", "--image-size", "8", "--channels", "1", "--batch-size", "8",
            "--backbone-options", '{"width": 8}', "--steps", "1", "--rounds", "2", "--warmup", "1",
            "--threads", "1", "--device", "cpu",
        ]
    )  # fmt: skip
    result = tp.measure(args)
    assert result["views"] == 2 and result["batch_size"] == 8
    assert len(result["ratios"]) == 2
    assert result["method_images_per_s"] > 0 and result["backbone_images_per_s"] > 0
    # The projection head and the loss add FLOPs: the ceiling is below 1.
    assert result["method_flops_per_image"] > result["backbone_flops_per_image"] > 0
    assert 0 < result["ceiling"] < 1
    assert math.isfinite(result["efficiency"]) and result["peak_memory_mb"] > 0
    assert 0 <= result["update_share"] < 1
