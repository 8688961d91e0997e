"""``train.precision=auto`` is resolved once per command, by ``build_components``, and every
training and encoding of that command (pretraining, ``selfsup eval``, fine-tuning, the
semi-supervised protocol, distillation) runs at the resolved value.

The CPU probe is monkeypatched (bf16 chosen, or fp32); nothing here times real bf16 work: the
spies record the precision they are handed and then compute in float32.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import selfsup.engine.distill as distill_module
import selfsup.engine.evaluation as evaluation_module
import selfsup.engine.finetune as finetune_module
import selfsup.engine.loop as loop_module
import selfsup.engine.protocols as protocols_module
from selfsup.cli import main
from selfsup.engine.build import build_components
from selfsup.engine.run import PretrainRun
from tests.conftest import tiny_config

V2 = ("method.proj_layers=3", "method.eval_features=head_middle", "method.proj_hidden_dim=24", "method.proj_dim=8")


def _probe(monkeypatch: pytest.MonkeyPatch, choice: str) -> list[int]:
    """A CPU with native bf16 units whose timing says ``choice``; returns the list of probe calls."""
    calls: list[int] = []

    def timing() -> tuple[float, float]:
        calls.append(1)
        return (2.0, 1.0) if choice == "bf16" else (1.0, 1.0)

    monkeypatch.setattr(loop_module, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    monkeypatch.setattr(loop_module, "time_bf16_on_cpu", timing)
    return calls


def _spy(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, seen: list[tuple[str, str]]) -> None:
    """Replace ``module.name`` by a wrapper that records its ``precision`` argument and then
    runs the original in float32 (the test must not depend on this CPU's bf16 speed)."""
    original: Callable[..., Any] = getattr(module, name)
    signature = inspect.signature(original)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        seen.append((name, bound.arguments["precision"]))
        bound.arguments["precision"] = "fp32"
        return original(*bound.args, **bound.kwargs)

    monkeypatch.setattr(module, name, wrapper)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny SimCLR v2 run (two steps at the default fp32) for the commands to load."""
    torch.manual_seed(0)
    run = PretrainRun(tiny_config(tmp_path_factory.mktemp("run"), "simclr", *V2, "train.max_steps=2"))
    run.fit()
    return run.run_dir


@pytest.mark.parametrize("choice", ["bf16", "fp32"])
def test_build_components_resolves_auto_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, choice: str) -> None:
    calls = _probe(monkeypatch, choice)
    parts = build_components(tiny_config(tmp_path, "simclr", "train.precision=auto"), torch.device("cpu"))
    assert parts.precision == choice and len(calls) == 1
    parts = build_components(tiny_config(tmp_path, "simclr", "train.precision=bf16"), torch.device("cpu"))
    assert parts.precision == "bf16" and len(calls) == 1, "an explicit precision is not probed"


@pytest.mark.parametrize("choice", ["bf16", "fp32"])
def test_pretraining_probes_once_and_records_the_resolved_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, choice: str
) -> None:
    calls = _probe(monkeypatch, choice)
    trainer = PretrainRun(tiny_config(tmp_path, "simclr", "train.max_steps=1", "train.precision=auto"))
    # One probe: the loop was handed the resolved value (an "auto" would have probed again).
    assert len(calls) == 1 and trainer.loop.precision == trainer.parts.precision == choice
    assert json.loads((trainer.run_dir / "resolved.json").read_text())["precision"] == choice


@pytest.mark.parametrize("choice", ["bf16", "fp32"])
@pytest.mark.parametrize(
    ("command", "where"),
    [
        (["eval", "knn"], [(evaluation_module, "encode")]),
        (["eval", "cluster"], [(protocols_module, "encode")]),
        (["eval", "finetune"], [(finetune_module, "adamw_epoch_loop")]),
        (["eval", "semi"], [(finetune_module, "adamw_epoch_loop")]),
        (["distill"], [(finetune_module, "adamw_epoch_loop"), (distill_module, "adamw_epoch_loop")]),
    ],
    ids=["eval-knn", "eval-cluster", "eval-finetune", "eval-semi", "distill"],
)
def test_every_command_runs_at_the_resolved_precision(
    run_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    choice: str,
    command: list[str],
    where: list[tuple[Any, str]],
) -> None:
    calls = _probe(monkeypatch, choice)
    seen: list[tuple[str, str]] = []
    for module, name in where:
        _spy(monkeypatch, module, name, seen)
    overrides = ["train.precision=auto", "eval.finetune_epochs=1", "eval.semi_fractions=[0.1]", "eval.linear=false"]
    extra = ["--epochs", "1"] if command == ["distill"] else []
    assert main([*command, str(run_dir), *overrides, *extra]) == 0
    capsys.readouterr()
    assert len(calls) == 1, "the probe runs once per command"
    assert seen, f"{command} never reached {where}"
    assert {precision for _, precision in seen} == {choice}, seen
    if command == ["distill"]:  # the teachers' fine-tuning and the student's distillation
        assert len(seen) == 3
