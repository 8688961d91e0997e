"""Tests for the ViT token-level API (MAE keep indices, mask tokens, attention maps)."""

from __future__ import annotations

import copy
import inspect
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from selfsup.nn.backbones.vit import (
    Attention,
    Block,
    DropPath,
    VisionTransformer,
    sincos_pos_embed_2d,
    without_drop_path,
)
from selfsup.nn.masking import mask_to_keep_indices, random_mask
from selfsup.nn.param_groups import layer_decay_param_groups
from selfsup.nn.patches import patchify
from selfsup.registry import BACKBONES

D, P, SIZE = 32, 4, 16  # 4x4 grid, 16 patches


def _vit(**kwargs: Any) -> VisionTransformer:
    options: dict[str, Any] = dict(in_channels=3, image_size=SIZE, patch_size=P, embed_dim=D, depth=2, num_heads=4)
    options.update(kwargs)
    return VisionTransformer(**options).eval()


def _mae_sincos(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """The MAE reference formula, written out in float64 NumPy."""

    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64))
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def test_sincos_matches_mae_formula() -> None:
    for gh, gw in [(4, 4), (3, 5)]:
        ours = sincos_pos_embed_2d(D, gh, gw).double().numpy()
        np.testing.assert_allclose(ours, _mae_sincos(D, gh, gw), atol=1e-6)
    model = _vit()
    assert model.pos_embed.shape == (1, 17, D)
    assert torch.all(model.pos_embed[0, 0] == 0)
    assert "pos_embed" not in model.state_dict()  # fixed buffer, recomputed on construction
    assert "pos_embed" in _vit(pos_embed="learned").state_dict()


def test_attributes_and_pooling() -> None:
    model = _vit()
    assert (model.patch_size, model.grid_size, model.num_patches) == (P, (4, 4), 16)
    assert model.embed_dim == model.num_features == D
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == 2
    assert isinstance(model.norm, nn.LayerNorm) and isinstance(model.patch_embed, nn.Module)
    x = torch.randn(2, 3, SIZE, SIZE)
    tokens = model.forward_tokens(x)
    assert tokens.shape == (2, 17, D)
    assert torch.equal(model(x), tokens[:, 0])
    avg = _vit(global_pool="avg")
    assert torch.allclose(avg(x), avg.forward_tokens(x)[:, 1:].mean(dim=1))


def test_tokens_equal_manual_patch_projection_plus_position() -> None:
    """With depth 0 the tokens are LN(patch @ W + b + pos): check the layout end to end."""
    model = _vit(depth=0)
    x = torch.randn(2, 3, SIZE, SIZE)
    weight = model.patch_embed.proj.weight  # (D, C, p, p) -> (D, p*p*C) in patchify's order
    flat_weight = weight.permute(0, 2, 3, 1).reshape(D, -1)
    pos = torch.from_numpy(_mae_sincos(D, 4, 4)).float()
    manual = patchify(x, P) @ flat_weight.T + model.patch_embed.proj.bias + pos
    expected = model.norm(manual)
    tokens = model.forward_tokens(x)
    assert torch.allclose(tokens[:, 1:], expected, atol=1e-5)
    assert torch.allclose(tokens[:, 0], model.norm(model.cls_token[0]).expand(2, -1), atol=1e-6)

    keep = mask_to_keep_indices(random_mask(2, 16, 0.75, torch.Generator().manual_seed(0)))
    kept = model.forward_tokens(x, keep_indices=keep)
    assert kept.shape == (2, 5, D)
    gathered = expected.gather(1, keep.unsqueeze(-1).expand(-1, -1, D))
    assert torch.allclose(kept[:, 1:], gathered, atol=1e-5)
    assert torch.allclose(kept[:, 0], tokens[:, 0])


def test_keep_indices_permutation_is_equivariant_through_attention() -> None:
    """Positions are added before the gather, so keeping all patches in a shuffled order must
    give the full-sequence tokens in that order (self-attention is permutation-equivariant)."""
    model = _vit(depth=2)
    x = torch.randn(2, 3, SIZE, SIZE)
    perm = torch.stack([torch.randperm(16), torch.randperm(16)])
    full = model.forward_tokens(x)
    shuffled = model.forward_tokens(x, keep_indices=perm)
    assert shuffled.shape == (2, 17, D)
    assert torch.allclose(shuffled[:, 0], full[:, 0], atol=1e-5)
    reordered = full[:, 1:].gather(1, perm.unsqueeze(-1).expand(-1, -1, D))
    assert torch.allclose(shuffled[:, 1:], reordered, atol=1e-5)
    # Dropping patches does change the visible tokens (they attend to fewer others).
    subset = model.forward_tokens(x, keep_indices=perm[:, :8])
    assert subset.shape == (2, 9, D)
    assert not torch.allclose(subset[:, 1:], shuffled[:, 1:9], atol=1e-4)


def test_mask_all_false_equals_plain_forward() -> None:
    model = _vit(use_mask_token=True)
    x = torch.randn(2, 3, SIZE, SIZE)
    none_masked = torch.zeros(2, 16, dtype=torch.bool)
    assert torch.equal(model.forward_tokens(x, mask=none_masked), model.forward_tokens(x))


def test_mask_token_replaces_masked_patches_before_positions() -> None:
    model = _vit(depth=0, use_mask_token=True)
    assert model.mask_token is not None
    x = torch.randn(2, 3, SIZE, SIZE)
    mask = random_mask(2, 16, 0.5, torch.Generator().manual_seed(1))
    masked = model.forward_tokens(x, mask=mask)[:, 1:]
    plain = model.forward_tokens(x)[:, 1:]
    pos = model.pos_embed[:, 1:].expand(2, -1, -1)
    expected_masked = model.norm(model.mask_token + pos)
    assert torch.allclose(masked[mask], expected_masked[mask], atol=1e-6)
    assert torch.equal(masked[~mask], plain[~mask])
    # Masked tokens still differ from each other: each keeps its own position.
    assert not torch.allclose(masked[mask][0], masked[mask][1])


def test_mask_token_gets_gradient_only_when_used() -> None:
    model = _vit(use_mask_token=True).train()
    x = torch.randn(2, 3, SIZE, SIZE)
    model(x).sum().backward()
    assert model.mask_token is not None and model.mask_token.grad is None
    mask = random_mask(2, 16, 0.5, torch.Generator().manual_seed(2))
    model.forward_tokens(x, mask=mask).sum().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


def test_mask_argument_errors() -> None:
    x = torch.randn(1, 3, SIZE, SIZE)
    no_token = _vit()
    assert no_token.mask_token is None
    with pytest.raises(ValueError, match="use_mask_token"):
        no_token.forward_tokens(x, mask=torch.zeros(1, 16, dtype=torch.bool))
    token = no_token.enable_mask_token()
    assert no_token.enable_mask_token() is token
    assert "mask_token" in dict(no_token.named_parameters())
    with pytest.raises(ValueError, match="bool"):
        no_token.forward_tokens(x, mask=torch.zeros(1, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="not both"):
        no_token.forward_tokens(
            x,
            keep_indices=torch.zeros(1, 4, dtype=torch.long),
            mask=torch.zeros(1, 16, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="divisible"):
        no_token(torch.randn(1, 3, 18, 16))


def test_last_self_attention_rows_are_distributions() -> None:
    model = _vit()
    attn = model.get_last_self_attention(torch.randn(2, 3, SIZE, SIZE))
    assert attn.shape == (2, 4, 17, 17)
    assert torch.all(attn >= 0)
    assert torch.allclose(attn.sum(dim=-1), torch.ones(2, 4, 17), atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.get_last_self_attention(torch.randn(2, 3, SIZE, SIZE))
    assert low.dtype == torch.float32  # weights stay float32 for attention maps
    assert torch.allclose(low.sum(dim=-1), torch.ones(2, 4, 17), atol=1e-5)


def test_explicit_attention_weights_reproduce_sdpa_output() -> None:
    attn = Attention(D, num_heads=4)
    x = torch.randn(2, 5, D)
    weights = attn.attention_weights(x)
    _, _, v = attn._qkv(x)
    manual = (weights @ v).transpose(1, 2).reshape(2, 5, D)
    assert torch.allclose(attn.proj(manual), attn(x), atol=1e-5)


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_other_input_sizes_interpolate_positions(pos_embed: str) -> None:
    model = _vit(pos_embed=pos_embed)
    small = torch.randn(2, 3, 8, 12)  # 2x3 grid
    assert model.forward_tokens(small).shape == (2, 7, D)
    assert model(small).shape == (2, D)
    assert model.get_last_self_attention(small).shape == (2, 4, 7, 7)
    assert model.interpolate_pos_encoding(4, 4) is model.pos_embed
    resized = model.interpolate_pos_encoding(2, 3)
    assert resized.shape == (1, 7, D)
    assert torch.equal(resized[:, 0], model.pos_embed[:, 0])
    if pos_embed == "sincos":
        assert torch.allclose(resized[0, 1:], sincos_pos_embed_2d(D, 2, 3))


def test_learned_positions_resize_smoothly() -> None:
    model = _vit(pos_embed="learned")
    with torch.no_grad():
        model.pos_embed.copy_(torch.linspace(-1, 1, D).expand(1, 17, D))
    resized = model.interpolate_pos_encoding(6, 6)
    # Bicubic resizing of a constant field is that constant.
    assert torch.allclose(resized, torch.linspace(-1, 1, D).expand(1, 37, D), atol=1e-5)
    resized.sum().backward()
    assert model.pos_embed.grad is not None


def test_frozen_patch_embed_gets_no_gradient() -> None:
    model = _vit().train()
    model.patch_embed.requires_grad_(False)
    model(torch.randn(2, 3, SIZE, SIZE)).sum().backward()
    assert all(p.grad is None for p in model.patch_embed.parameters())
    assert model.cls_token.grad is not None
    assert all(p.grad is not None for p in model.blocks.parameters())


def test_drop_path_drops_whole_samples_in_training_only() -> None:
    drop = DropPath(0.5)
    x = torch.ones(64, 3, 5)
    assert torch.equal(drop.eval()(x), x)
    out = drop.train()(x)
    per_sample = out.reshape(64, -1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert torch.all(per_sample.min(dim=1).values == per_sample.max(dim=1).values)
    assert 0 < int((per_sample[:, 0] == 0).sum()) < 64
    model = _vit(drop_path_rate=0.2, depth=3)
    rates = [block.drop_path.p for block in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])


@pytest.mark.parametrize("name,dim,heads", [("vit_tiny", 192, 3), ("vit_small", 384, 6), ("vit_base", 768, 12)])
def test_named_configurations(name: str, dim: int, heads: int) -> None:
    model = BACKBONES.build(name, in_channels=1, image_size=32, depth=1)
    assert model.embed_dim == model.num_features == dim
    assert model.blocks[0].attn.num_heads == heads
    assert model.patch_size == 16 and model.grid_size == (2, 2)
    assert inspect.signature(BACKBONES.get(name)).parameters["depth"].default == 12


# ------------------------------------------------------------------------ register tokens
R = 3  # registers in the tests below (the paper uses 4)


def test_registers_are_dropped_from_every_output_shape() -> None:
    """Darcet et al. 2023: registers are scratch tokens, discarded at the output, so every
    caller of the token API (MAE, SimMIM, iBOT, dense probes, attention maps) is unchanged."""
    model = _vit(num_registers=R, use_mask_token=True)
    assert model.register_tokens is not None and model.register_tokens.shape == (1, R, D)
    assert "register_tokens" in model.state_dict() and "register_tokens" not in _vit().state_dict()
    x = torch.randn(2, 3, SIZE, SIZE)
    every = model.forward_all_tokens(x)
    tokens = model.forward_tokens(x)
    assert every.shape == (2, 1 + R + 16, D) and tokens.shape == (2, 17, D)
    assert torch.equal(tokens[:, 0], every[:, 0]) and torch.equal(tokens[:, 1:], every[:, 1 + R :])
    assert torch.equal(model(x), tokens[:, 0])
    avg = _vit(num_registers=R, global_pool="avg")
    assert torch.allclose(avg(x), avg.forward_all_tokens(x)[:, 1 + R :].mean(dim=1))  # registers not pooled
    keep = mask_to_keep_indices(random_mask(2, 16, 0.75, torch.Generator().manual_seed(0)))
    assert model.forward_tokens(x, keep_indices=keep).shape == (2, 5, D)
    mask = random_mask(2, 16, 0.5, torch.Generator().manual_seed(1))
    assert model.forward_tokens(x, mask=mask).shape == (2, 17, D)
    assert model.get_last_self_attention(x).shape == (2, 4, 17, 17)
    plain = _vit()
    assert torch.equal(plain.forward_all_tokens(x), plain.forward_tokens(x))  # R = 0: identical
    with pytest.raises(ValueError, match="num_registers"):
        _vit(num_registers=-1)


def test_registers_carry_no_position_and_are_used_by_the_blocks() -> None:
    model = _vit(num_registers=R).train()
    x = torch.randn(2, 3, SIZE, SIZE)
    assert model.register_tokens is not None
    sequence = model._embed(x)
    assert sequence.shape == (2, 1 + R + 16, D)
    assert torch.equal(sequence[:, 1 : 1 + R], model.register_tokens.expand(2, -1, -1))  # no position added
    torch.testing.assert_close(sequence[:, 0], (model.cls_token + model.pos_embed[:, :1])[:, 0].expand(2, -1))
    # The class token attends to the registers: they shape the output and learn from it.
    model(x).sum().backward()
    assert model.register_tokens.grad is not None and model.register_tokens.grad.abs().sum() > 0
    with torch.no_grad():
        before = model.eval()(x)
        model.register_tokens.add_(torch.randn_like(model.register_tokens))  # (a constant would vanish in LN)
        assert not torch.allclose(model(x), before, atol=1e-4)


def test_registers_patch_tokens_follow_the_patches_positions() -> None:
    """Patch tokens of a register ViT at depth 0 are exactly the plain ViT's (same weights)."""
    plain = _vit(depth=0)
    model = _vit(depth=0, num_registers=R)
    model.load_state_dict({**plain.state_dict(), "register_tokens": model.register_tokens}, strict=True)
    x = torch.randn(2, 3, SIZE, SIZE)
    assert torch.equal(model.forward_tokens(x), plain.forward_tokens(x))


def test_attention_with_registers_leaves_their_rows_and_columns_out() -> None:
    model = _vit(num_registers=R)
    x = torch.randn(2, 3, SIZE, SIZE)
    attn = model.get_last_self_attention(x)
    # The full attention over 1 + R + L tokens, computed by hand from the last block.
    tokens = model._embed(x)
    for block in model.blocks[:-1]:
        tokens = block(tokens)
    last = model.blocks[-1]
    assert isinstance(last, Block)
    full = last.attn.attention_weights(last.norm1(tokens))
    keep = [0, *range(1 + R, 1 + R + 16)]
    torch.testing.assert_close(attn, full[:, :, keep][:, :, :, keep])
    register_mass = full[:, :, keep][:, :, :, 1 : 1 + R].sum(dim=-1)
    torch.testing.assert_close(attn.sum(dim=-1), 1 - register_mass)
    assert torch.all(register_mass > 0)


def test_layer_decay_puts_registers_with_the_embeddings_without_weight_decay() -> None:
    model = _vit(num_registers=R)
    groups = layer_decay_param_groups(model, nn.Linear(D, 2), layer_decay=0.5)
    (group,) = [g for g in groups if "encoder.register_tokens" in g["param_names"]]
    assert group["layer_id"] == 0 and group["weight_decay"] == 0.0


@pytest.mark.parametrize("name", ["vit_tiny", "vit_small", "vit_base"])
def test_named_configurations_take_registers(name: str) -> None:
    model = BACKBONES.build(name, in_channels=1, image_size=32, depth=1, num_registers=4)
    assert model.num_registers == 4 and model.forward_tokens(torch.randn(1, 1, 32, 32)).shape[1] == 5


# -------------------------------------------------------------------- drop path in teachers
def test_without_drop_path_makes_a_training_mode_teacher_deterministic() -> None:
    student = _vit(drop_path_rate=0.5, depth=3).train()
    x = torch.randn(4, 3, SIZE, SIZE)
    assert not torch.equal(student(x), student(x))  # stochastic depth at work
    teacher = without_drop_path(copy.deepcopy(student)).train()
    assert all(m.p == 0.0 for m in teacher.modules() if isinstance(m, DropPath))
    assert torch.equal(teacher(x), teacher(x))
    torch.testing.assert_close(teacher(x), student.eval()(x))  # the whole network, as in eval mode
    assert [b.drop_path.p for b in student.blocks] == pytest.approx([0.0, 0.25, 0.5])  # student untouched


def test_set_drop_path_rate_rescales_linearly_over_blocks() -> None:
    model = _vit(depth=3)
    model.set_drop_path_rate(0.1)
    assert [b.drop_path.p for b in model.blocks] == pytest.approx([0.0, 0.05, 0.1])
