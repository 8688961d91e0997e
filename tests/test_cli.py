"""End-to-end runs through the real command line (tiny: digits, narrow ConvNet)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfsup.cli import main

pytestmark = pytest.mark.slow
DIGITS = str(Path(__file__).resolve().parents[1] / "configs" / "simclr" / "digits.yaml")


def _args(tmp_path: Path, method: str, *extra: str) -> list[str]:
    return [
        "data.name=digits",
        "backbone.name=convnet",
        "backbone.width=8",
        f"method.name={method}",
        "train.batch_size=64",
        "train.epochs=2",
        "train.progress=false",
        "train.knn_every=1",
        "eval.linear_epochs=10",
        f"run.out_dir={tmp_path}",
        f"run.name={method}",
        *extra,
    ]


def test_pretrain_writes_a_complete_run_folder_and_eval_reads_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pretrain", DIGITS, *_args(tmp_path, "simclr")]) == 0
    run = tmp_path / "simclr"
    for name in [
        "config.yaml",
        "resolved.json",
        "metrics.jsonl",
        "checkpoints/last.pt",
        "backbone.safetensors",
        "results.json",
        "results.txt",
        "loss_curve.png",
    ]:
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("knn_top1" in r for r in records)
    results = json.loads((run / "results.json").read_text())
    assert set(results) == {"simclr (convnet)", "random-init convnet", "raw pixels", "HOG"}
    for metrics in results.values():
        assert {"knn_top1@20", "knn_top1@200", "linear_top1"} <= set(metrics)
    out = capsys.readouterr().out
    assert "raw pixels" in out and "knn_top1@20" in out

    assert main(["eval", "knn", str(run), "--baselines"]) == 0
    out = capsys.readouterr().out
    assert "knn_top1@20" in out and "raw pixels" in out
    assert main(["eval", "linear", str(run / "checkpoints" / "last.pt"), "eval.linear_epochs=5"]) == 0
    assert "linear_top1" in capsys.readouterr().out


def test_resume_command_finishes_a_run(tmp_path: Path) -> None:
    config = DIGITS.replace("simclr", "byol")
    assert main(["pretrain", config, *_args(tmp_path, "byol", "train.max_steps=3", "eval.at_end=false")]) == 0
    run = tmp_path / "byol"
    assert main(["resume", str(run), "train.max_steps=5"]) == 0
    from selfsup.engine.checkpoint import load_checkpoint

    assert load_checkpoint(run)["step"] == 5


def test_list_and_config_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["list", "methods"]) == 0
    listed = capsys.readouterr().out.split()
    assert {"simclr", "moco_v2", "byol"} <= set(listed)
    assert main(["pretrain", DIGITS, "train.epoch=1"]) == 2
    err = capsys.readouterr().err
    assert "train.epoch" in err and "epochs" in err
    assert main(["pretrain", DIGITS, "method.temprature=0.1", f"run.out_dir={tmp_path}"]) == 2
    assert "did you mean 'temperature'" in capsys.readouterr().err
