"""Shared plumbing for the loss functions: full precision under autocast."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def _upcast(obj: Any) -> Any:
    # float64 stays float64 so that gradcheck and reference tests run in double.
    if isinstance(obj, Tensor) and obj.is_floating_point():
        return obj.to(torch.promote_types(obj.dtype, torch.float32))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_upcast(o) for o in obj)
    return obj


def _first_tensor(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, (list, tuple)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def full_precision(fn: _Fn) -> _Fn:
    """Run a loss in at least float32 with autocast disabled, whatever the caller's context.

    Half-precision tensor arguments (also inside lists) are cast to float32; autocast is
    switched off for their device because it would otherwise run the matmuls and
    softmaxes inside the loss in half precision again, where exp/log of logits scaled by
    ``1 / temperature`` lose most of their digits.

    References: Micikevicius et al. 2018, "Mixed Precision Training", arXiv:1710.03740.
    """

    @functools.wraps(fn)
    def _wrapper(*args: Any, **kwargs: Any) -> Any:
        ref = _first_tensor(list(args) + list(kwargs.values()))
        device_type = ref.device.type if ref is not None else "cpu"
        args = tuple(_upcast(a) for a in args)
        kwargs = {k: _upcast(v) for k, v in kwargs.items()}
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*args, **kwargs)

    return _wrapper  # type: ignore[return-value]
