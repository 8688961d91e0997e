"""Tests for the faster evaluation of issue 25 beyond kNN: the linear probe's early stopping on
the held-out slice (per fit and along the weight-decay path)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from selfsup.eval import linear as linear_module
from selfsup.eval.linear import LinearProbe, linear_probe


def _overlapping_blobs(n: int, dim: int, classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """Gaussian blobs close enough that no probe is perfect (the decay matters)."""
    g = torch.Generator().manual_seed(seed)
    centres = 0.3 * torch.randn(classes, dim, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    return centres[labels] + torch.randn(n, dim, generator=g), labels


@pytest.fixture
def count_evaluations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the L-BFGS iterations of every ``step`` call (``n_iter`` of its state)."""
    counts: list[int] = []
    original = torch.optim.LBFGS.step

    def step(self: torch.optim.LBFGS, closure: Any) -> Any:
        state = self.state[self._params[0]]
        before = state.get("n_iter", 0)
        out = original(self, closure)
        counts.append(self.state[self._params[0]]["n_iter"] - before)
        return out

    monkeypatch.setattr(torch.optim.LBFGS, "step", step)
    return counts


def test_early_stopping_keeps_the_result_and_saves_iterations(count_evaluations: list[int]) -> None:
    """Same chosen decay and test accuracy (to a sample or two) for far fewer iterations."""
    x, y = _overlapping_blobs(3000, 64, 10, seed=0)
    xt, yt = x[2000:], y[2000:]
    x, y = x[:2000], y[:2000]
    full = linear_probe(x, y, xt, yt, epochs=100, early_stop=False)
    full_evals = sum(count_evaluations)
    count_evaluations.clear()
    fast = linear_probe(x, y, xt, yt, epochs=100, early_stop=True)
    fast_evals = sum(count_evaluations)
    assert isinstance(full, dict) and isinstance(fast, dict)
    assert fast["linear_weight_decay"] == full["linear_weight_decay"]
    assert abs(fast["linear_top1"] - full["linear_top1"]) <= 2 / 1000
    assert fast_evals < 0.5 * full_evals, (fast_evals, full_evals)


def test_chunked_fit_follows_one_long_call() -> None:
    """Stepping L-BFGS in chunks of 10 iterations (the monitored fit, with a monitor that never
    stops it) lands on the weights of one uninterrupted call."""
    x, y = _overlapping_blobs(400, 12, 4, seed=1)
    x = (x - x.mean(0)) / x.std(0)
    probes = [LinearProbe(12, 4), LinearProbe(12, 4)]
    rising = iter(range(1000))
    linear_module._fit_lbfgs(probes[0], x, y, 1e-3, 30, 1.0, None)
    linear_module._fit_lbfgs(probes[1], x, y, 1e-3, 30, 1.0, None, monitor=lambda: float(next(rising)))
    torch.testing.assert_close(probes[1].linear.weight, probes[0].linear.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probes[1].linear.bias, probes[0].linear.bias, rtol=1e-5, atol=1e-6)


def test_fit_stops_when_held_out_accuracy_is_flat(count_evaluations: list[int]) -> None:
    """A constant held-out accuracy stops the fit after the patience's checks (20 iterations)."""
    x, y = _overlapping_blobs(2000, 64, 10, seed=2)
    probe = LinearProbe(64, 10)
    linear_module._fit_lbfgs(probe, x, y, 1e-6, 100, 1.0, None, monitor=lambda: 0.5)
    checks = linear_module._PATIENCE + 1  # the first check sets the best
    assert count_evaluations == [linear_module._CHECK_EVERY] * checks
