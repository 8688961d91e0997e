"""The cluster / retrieval / semi protocols and the embedding and kNN-curve plots on a tiny run
(2 epochs on digits, narrow ConvNet): commands, results.json rows, one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from selfsup.cli import main
from selfsup.config import ConfigError
from selfsup.engine.run import pretrain
from selfsup.report import load_run, method_table
from tests.conftest import tiny_config

FRACTIONS = "eval.semi_fractions=[0.1]"  # digits has ~144 training images per class
QUICK = ("eval.finetune_epochs=1", "eval.linear_epochs=2")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch run whose end-of-run evaluation has every protocol and the baselines on."""
    tmp = tmp_path_factory.mktemp("protocols")
    cfg = tiny_config(
        tmp,
        "simclr",
        "train.epochs=2",
        "train.knn_every=1",  # online kNN after epoch 1 (not after the last: the final eval covers it)
        "eval.at_end=true",
        "eval.baselines=true",
        "eval.cluster=true",
        "eval.retrieval=true",
        "eval.semi=true",
        FRACTIONS,
        *QUICK,
    )
    pretrain(cfg)
    return tmp / "tiny"


def _finite(rows: dict[str, dict[str, float]], keys: set[str]) -> None:
    for name, metrics in rows.items():
        assert keys <= set(metrics), (name, set(metrics))
        assert all(math.isfinite(metrics[k]) and 0 <= metrics[k] <= 1 for k in keys), (name, metrics)


FROZEN = {"cluster_acc", "nmi", "ari", "retrieval_map@r", "retrieval_recall@1", "retrieval_recall@5"}


def test_results_json_has_the_enabled_protocols(tiny_run: Path) -> None:
    rows = json.loads((tiny_run / "results.json").read_text())
    assert list(rows) == ["simclr (convnet)", "random-init convnet", "raw pixels", "HOG"]
    _finite(rows, FROZEN | {"knn_top1@20"})
    _finite({k: rows[k] for k in ("simclr (convnet)", "random-init convnet")}, {"semi_top1@10%"})
    assert "semi_top1@10%" in (tiny_run / "results.txt").read_text()
    # online kNN evaluations do not run the extra protocols
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert any("knn_top1" in r for r in records) and not any("nmi" in r for r in records)
    table = method_table([load_run(tiny_run)])  # the report shows the protocols' columns
    assert all(h in table for h in ("10% labels", "k-means ACC", "NMI", "ARI", "mAP@R", "R@1"))


@pytest.mark.parametrize("protocol", ["cluster", "retrieval"])
def test_frozen_protocol_commands_with_baselines(
    protocol: str, tiny_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", protocol, str(tiny_run), "--baselines", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    rows = json.loads(out[-1])
    assert list(rows) == ["simclr (convnet)", "random-init convnet", "raw pixels", "HOG"]
    keys = {"cluster_acc", "nmi", "ari"} if protocol == "cluster" else {k for k in FROZEN if "retrieval" in k}
    _finite(rows, keys)
    assert all(set(m) == keys for m in rows.values())
    if protocol == "retrieval":  # raw digits retrieve their class well; a sanity floor
        assert rows["raw pixels"]["retrieval_recall@1"] > 0.8


def test_semi_command_and_bad_fraction(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "semi", str(tiny_run), FRACTIONS, "eval.semi_fractions=[0.05,0.1]", *QUICK, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(rows) == ["simclr (convnet)", "random-init convnet"]
    _finite(rows, {"semi_top1@5%", "semi_top1@10%"})

    assert main(["eval", "semi", str(tiny_run), "eval.semi_fractions=[0.001]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: eval.semi_fractions: 0.1% of the labels leaves class") and "\n" not in err


def test_pretrain_refuses_a_bad_semi_fraction_before_training(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "simclr", "eval.at_end=true", "eval.semi=true", "eval.semi_fractions=[0.001]")
    with pytest.raises(ConfigError, match="without a label"):
        pretrain(cfg)
    assert not (tmp_path / "tiny" / "checkpoints").exists()


def test_visualize_embeddings_and_knn_curve(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tsne.png"
    assert main(["visualize", "embeddings", str(tiny_run), "--samples", "150", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["visualize", "knn-curve", str(tiny_run)]) == 0
    assert (tiny_run / "knn_curve.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    try:
        import umap  # noqa: F401
    except ImportError:
        assert main(["visualize", "embeddings", str(tiny_run), "--method", "umap"]) == 2
        err = capsys.readouterr().err.strip()
        assert "selfsup[umap]" in err and "\n" not in err


def test_knn_curve_of_a_run_without_online_knn_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pretrain(tiny_config(tmp_path, "simclr", "train.max_steps=2"))
    assert main(["visualize", "knn-curve", str(tmp_path / "tiny")]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.knn_every=0" in err and "\n" not in err
