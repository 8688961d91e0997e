"""Batch norm over interleaved row groups in one call equals one call per group (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from selfsup.nn.grouped_bn import batch_norm_groups, grouped_batch_norm
from selfsup.nn.heads import mlp_head
from selfsup.registry import BACKBONES


def _interleave(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Rows of the ``groups`` contiguous chunks of ``x``, interleaved: chunk g's row i at i * G + g."""
    return x.unflatten(0, (groups, -1)).transpose(0, 1).flatten(0, 1)


def _deinterleave(y: torch.Tensor, groups: int) -> torch.Tensor:
    return y.unflatten(0, (-1, groups)).transpose(0, 1).flatten(0, 1)


@pytest.mark.parametrize("groups", [2, 3])
def test_one_call_with_grouped_bn_equals_one_call_per_group(groups: int) -> None:
    torch.manual_seed(0)
    backbone = BACKBONES.build("convnet", in_channels=1, image_size=16, width=8)
    per_group = nn.Sequential(backbone, mlp_head(backbone.num_features, 32, 16)).double()
    grouped = copy.deepcopy(per_group)
    x = torch.randn(4 * groups, 1, 16, 16, dtype=torch.float64)
    for _ in range(2):  # the second step starts from the updated running statistics
        expected = torch.cat([per_group(chunk) for chunk in x.chunk(groups)])
        with batch_norm_groups(grouped, groups):
            got = _deinterleave(grouped(_interleave(x, groups)), groups)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        weights = torch.randn_like(expected)
        grads_expected = torch.autograd.grad((weights * expected).sum(), list(per_group.parameters()))
        grads_got = torch.autograd.grad((weights * got).sum(), list(grouped.parameters()))
        for a, b in zip(grads_got, grads_expected):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for (name, a), b in zip(grouped.named_buffers(), per_group.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)  # running stats, batch counts


def test_the_context_restores_plain_batch_norm_and_skips_eval_mode() -> None:
    bn = nn.BatchNorm1d(3).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    with batch_norm_groups(bn, 2):
        assert not torch.allclose(bn(x), nn.functional.batch_norm(x, None, None, training=True))
    assert "forward" not in vars(bn)
    torch.testing.assert_close(bn(x), nn.functional.batch_norm(x, None, None, training=True))
    bn.eval()
    with batch_norm_groups(bn, 2):  # running statistics: nothing depends on the batch
        assert "forward" not in vars(bn)
    with pytest.raises(ValueError, match="groups"):
        grouped_batch_norm(nn.BatchNorm1d(3).train(), torch.randn(5, 3), 2)
