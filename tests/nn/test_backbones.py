"""Registry-driven contract tests for every backbone, plus ResNet/ConvNet/timm specifics."""

from __future__ import annotations

import inspect
import sys
from typing import Any

import pytest
import torch
from torch import nn

from selfsup.nn.backbones.convnet import ConvNet
from selfsup.nn.backbones.protocol import feature_dim, feature_map, feature_map_dim
from selfsup.nn.backbones.resnet import BasicBlock, Bottleneck, ResNet
from selfsup.registry import BACKBONES

IMAGE_SIZE = 16
NAMES = [name for name in BACKBONES.names() if name != "timm"]


def _small_kwargs(name: str) -> dict[str, Any]:
    """Overrides that make each backbone tiny; zero_init_residual off so every grad is nonzero."""
    if name.startswith("vit"):
        return dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)
    if name.startswith("resnet"):
        return dict(stem="cifar", width=0.125, zero_init_residual=False)
    if name == "convnet":
        return dict(width=8)
    return {}


def _build(name: str, in_channels: int = 3) -> nn.Module:
    return BACKBONES.build(name, in_channels=in_channels, image_size=IMAGE_SIZE, **_small_kwargs(name))


def test_every_factory_takes_in_channels_and_image_size() -> None:
    for name in BACKBONES.names():
        params = inspect.signature(BACKBONES.get(name)).parameters
        assert params["in_channels"].default == 3, name
        assert params["image_size"].default == 224, name


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_output_shape_is_batch_by_num_features(name: str, in_channels: int) -> None:
    model = _build(name, in_channels)
    assert isinstance(model.num_features, int) and model.num_features > 0
    out = model(torch.randn(2, in_channels, IMAGE_SIZE, IMAGE_SIZE))
    assert out.shape == (2, model.num_features)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name: str) -> None:
    model = _build(name).train()
    out = model(torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE))
    (out * torch.randn_like(out)).sum().backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: {pname} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name}: {pname} has an all-zero gradient"


@pytest.mark.parametrize("name", NAMES)
def test_channels_last_and_bf16_autocast(name: str) -> None:
    model = _build(name).eval()
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        reference = model(x)
        model = model.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        assert torch.allclose(model(x_cl), reference, atol=1e-4, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x_cl)
    assert low.shape == reference.shape
    assert torch.isfinite(low).all()
    cosine = nn.functional.cosine_similarity(low.float(), reference, dim=1)
    assert torch.all(cosine > 0.98), cosine


@pytest.mark.parametrize("name", NAMES)
def test_eval_mode_is_deterministic_and_per_sample(name: str) -> None:
    model = _build(name)
    model(torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE))  # one train step moves BN statistics
    model.eval()
    x = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        first, second = model(x), model(x)
        alone = model(x[:1])
    assert torch.equal(first, second)
    # In eval mode no sample may influence another (BN must use running statistics).
    assert torch.allclose(alone, first[:1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- ResNet


@pytest.mark.parametrize(
    "name,expected",
    # Parameter counts of the reference ResNets without their fc layer.
    [("resnet18", 11_176_512), ("resnet50", 23_508_032)],
)
def test_resnet_parameter_count_matches_reference(name: str, expected: int) -> None:
    model = BACKBONES.build(name)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize(
    "name,width,features",
    [
        ("resnet18", 1.0, 512),
        ("resnet34", 0.5, 256),
        ("resnet50", 0.25, 512),
        ("resnet18", 0.25, 128),
    ],
)
def test_resnet_num_features_follow_width(name: str, width: float, features: int) -> None:
    model = BACKBONES.build(name, stem="cifar", width=width)
    assert model.num_features == features


def test_resnet_stems_set_the_output_stride() -> None:
    x = torch.randn(1, 3, 64, 64)
    imagenet = ResNet(BasicBlock, (1, 1, 1, 1), stem="imagenet", width=0.125)
    cifar = ResNet(BasicBlock, (1, 1, 1, 1), stem="cifar", width=0.125)
    assert imagenet.forward_features(x).shape[-2:] == (2, 2)  # stride 32
    assert cifar.forward_features(x).shape[-2:] == (8, 8)  # stride 8
    assert isinstance(imagenet.maxpool, nn.MaxPool2d) and imagenet.conv1.kernel_size == (7, 7)
    assert isinstance(cifar.maxpool, nn.Identity) and cifar.conv1.kernel_size == (3, 3)
    with pytest.raises(ValueError, match="stem"):
        ResNet(BasicBlock, (1, 1, 1, 1), stem="tiny")


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_zero_init_residual_makes_blocks_start_as_identity(block: type[nn.Module]) -> None:
    model = ResNet(block, (1, 1, 1, 1), stem="cifar", width=0.125, zero_init_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert blocks and all(torch.all(b.last_bn().weight == 0) for b in blocks)
    unit = model.layer1[0].eval()
    x = torch.randn(2, unit.conv1.in_channels, 8, 8)
    shortcut = x if unit.downsample is None else unit.downsample(x)
    assert torch.equal(unit(x), torch.relu(shortcut))
    plain = ResNet(block, (1, 1, 1, 1), stem="cifar", width=0.125, zero_init_residual=False)
    plain_blocks = [m for m in plain.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert all(torch.all(b.last_bn().weight == 1) for b in plain_blocks)


# ---------------------------------------------------------------- ConvNet


@pytest.mark.parametrize("norm", ["bn", "gn", "none"])
def test_convnet_norm_options(norm: str) -> None:
    model = ConvNet(in_channels=1, width=8, depth=3, norm=norm)
    kinds = {nn.BatchNorm2d: "bn", nn.GroupNorm: "gn"}
    found = {kinds[type(m)] for m in model.modules() if type(m) in kinds}
    assert found == ({norm} if norm != "none" else set())
    conv_bias = [m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(conv_bias) == (norm == "none")
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 32)


def test_convnet_downsampling_schedule_and_width_cap() -> None:
    x = torch.randn(2, 1, 28, 28)
    assert ConvNet(1, width=4, stem_stride=2).forward_features(x).shape == (2, 32, 2, 2)
    assert ConvNet(1, width=4, stem_stride=1).forward_features(x).shape == (2, 32, 4, 4)
    deep = ConvNet(1, width=4, depth=6)
    assert deep.num_features == 32  # doubling stops at 8 * width
    assert deep.forward_features(x).shape == (2, 32, 1, 1)  # no pooling below 1x1
    assert deep(x).shape == (2, 32)
    with pytest.raises(ValueError, match="norm"):
        ConvNet(norm="ln")
    with pytest.raises(ValueError, match="pool"):
        ConvNet(pool="lp")


def test_convnet_avg_pool_option() -> None:
    model = ConvNet(3, width=4, depth=3, pool="avg")
    assert isinstance(model.pool, nn.AvgPool2d)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 16)


# ---------------------------------------------------------------- timm adapter


def test_timm_missing_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r'pip install "selfsup\[timm\]"'):
        BACKBONES.build("timm", model_name="resnet18")


def test_timm_backbone_when_installed() -> None:
    pytest.importorskip("timm")
    model = BACKBONES.build("timm", model_name="resnet18", in_channels=1, image_size=32)
    out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, model.num_features)


def test_feature_map_is_the_spatial_features_before_pooling() -> None:
    from selfsup.nn.backbones.protocol import feature_map
    from selfsup.registry import BACKBONES

    x = torch.randn(2, 3, 32, 32)
    for name, options in [
        ("convnet", {"width": 8}),
        ("resnet18", {"stem": "cifar"}),
        ("vit_tiny", {"patch_size": 4, "image_size": 32}),
    ]:
        backbone = BACKBONES.build(name, in_channels=3, **options).eval()
        fmap = feature_map(backbone, x)
        assert fmap.shape[:2] == (2, backbone.num_features)
        if name.startswith("vit"):
            assert fmap.shape[-2:] == (8, 8)
            # the patch tokens, in grid order
            tokens = backbone.forward_tokens(x)[:, 1:]
            torch.testing.assert_close(fmap.flatten(2).transpose(1, 2), tokens)
        else:
            torch.testing.assert_close(fmap.mean(dim=(-2, -1)), backbone(x))


def test_convnet_out_grid_flattens_the_averaged_cells_channel_major() -> None:
    """out_grid=g: each channel's map averaged over a g x g grid of cells, channel-major."""
    torch.manual_seed(0)
    net = ConvNet(in_channels=1, width=4, depth=2, out_grid=2).eval()
    x = torch.randn(3, 1, 16, 16)
    fmap = net.forward_features(x)  # (3, 8, 4, 4): 16 -> 8 (stem) -> 4 (pool)
    assert fmap.shape == (3, 8, 4, 4)
    # Independent computation: the mean of each 2x2 block of the 4x4 map, in plain loops.
    expected = torch.empty(3, 8, 2, 2)
    for i in range(2):
        for j in range(2):
            expected[:, :, i, j] = fmap[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean(dim=(-2, -1))
    out = net(x)
    assert feature_dim(net) == 32 and feature_map_dim(net) == 8
    assert out.shape == (3, 32)
    torch.testing.assert_close(out, expected.reshape(3, 32))
    assert feature_map(net, x).shape[1] == feature_map_dim(net)
    # No weights of its own: a state dict loads across read-outs, and out_grid=1 is the global mean.
    flat = ConvNet(in_channels=1, width=4, depth=2, out_grid=1).eval()
    flat.load_state_dict(net.state_dict())
    torch.testing.assert_close(flat(x), fmap.mean(dim=(-2, -1)))
    with pytest.raises(ValueError, match="out_grid"):
        ConvNet(out_grid=0)
