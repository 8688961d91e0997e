"""Tokenizer evaluation (``Method.evaluate_tokens``): reconstruction error and codebook use over a
whole split against plain float64 computations, the run's final evaluation and `selfsup eval
tokenizer` writing them into results.json, and `selfsup report`'s tokenizer table."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import Tensor, nn

from selfsup.cli import main as cli_main
from selfsup.config import Config, apply_overrides, from_dict
from selfsup.engine.run import PretrainRun
from selfsup.methods.base import Batch, Method, StepInfo
from selfsup.methods.vq_tokenizer import VQTokenizer, evaluate_tokenizer
from selfsup.methods.vqkd_tokenizer import VQKDTokenizerMethod
from selfsup.registry import BACKBONES
from selfsup.report import main as report_main
from tests.conftest import tiny_config

INFO = StepInfo(step=0, total_steps=1, epoch=0.0)


def smooth_images(batch: int, size: int = 16, seed: int = 0) -> Tensor:
    """Normalised smooth random images `(B, 1, S, S)` (4x4 noise upsampled)."""
    coarse = torch.rand(batch, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    return (nn.functional.interpolate(coarse, size=size, mode="bilinear") - 0.5) / 0.25


def reference(method: Method, x: Tensor, ids: Tensor, codebook_size: int) -> dict[str, float]:
    """The metrics computed plainly: the method's own reconstruction loss on all images as one
    batch (eval mode), usage and perplexity from a histogram counted in Python, in float64."""
    method.eval()
    with torch.no_grad():
        rec = float(method.training_step(Batch(views=[x], index=torch.arange(len(x))), INFO)["reconstruction_loss"])
    method.train()
    counts = Counter(ids.reshape(-1).tolist())
    n = sum(counts.values())
    entropy = -sum(c / n * math.log(c / n) for c in counts.values())
    return {
        "tokenizer_reconstruction": rec,
        "codebook_usage": len(counts) / codebook_size,
        "codebook_perplexity": math.exp(entropy),
        "codebook_size": float(codebook_size),
    }


def chunks(x: Tensor, size: int) -> Iterator[Tensor]:
    yield from x.split(size)


def assert_metrics_close(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert math.isclose(got[key], value, rel_tol=1e-5, abs_tol=1e-7), (key, got[key], value)


def record_modes(module: nn.Module) -> list[bool]:
    """The ``training`` flag of ``module`` at each of its forward calls from now on."""
    seen: list[bool] = []
    module.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    return seen


def test_whole_split_histogram_and_term_weighted_mean_from_a_hand_computed_case() -> None:
    """Two batches: ids {0: 2, 1: 1, 3: 3} of 8 codes; 5 error terms (1, 1, 1, 1 | 4) average to 8/5,
    not to the mean of the batch means (2.5)."""
    batches = [(torch.ones(4), torch.tensor([0, 0, 1, 3])), (torch.tensor([4.0]), torch.tensor([[3, 3]]))]
    lookup = {id(x): (x, ids) for x, ids in batches}
    owner = nn.Linear(1, 1)
    got = evaluate_tokenizer(owner, (x for x, _ in batches), lambda x: lookup[id(x)], codebook_size=8)
    p = [2 / 6, 1 / 6, 3 / 6]
    want = {
        "tokenizer_reconstruction": 8 / 5,
        "codebook_usage": 3 / 8,
        "codebook_perplexity": math.exp(-sum(q * math.log(q) for q in p)),
        "codebook_size": 8.0,
    }
    assert_metrics_close(got, want)
    assert owner.training  # its mode is given back
    with pytest.raises(ValueError, match="no images"):
        evaluate_tokenizer(owner, iter([]), lambda x: lookup[id(x)], codebook_size=8)


def test_vq_tokenizer_metrics_equal_its_loss_and_a_plain_histogram() -> None:
    torch.manual_seed(0)
    method = VQTokenizer(in_channels=1, image_size=16, patch_size=4, hidden_dim=8, code_dim=4, codebook_size=64)
    x = smooth_images(20)
    modes = record_modes(method.tokenizer.encoder)
    got = method.evaluate_tokens(chunks(x, 8))  # batches of 8, 8, 4
    assert modes and not any(modes)  # eval mode throughout
    assert method.training  # and the previous mode afterwards
    assert all(p.grad is None for p in method.parameters())
    want = reference(method, x, method.tokenizer.tokenize(x), 64)
    assert_metrics_close(got, want)
    assert 0 < got["codebook_usage"] < 1  # a non-trivial histogram: some codes unused
    assert 1 < got["codebook_perplexity"] <= 64 * got["codebook_usage"] + 1e-9


def test_vqkd_tokenizer_metrics_equal_its_cosine_loss_and_a_plain_histogram() -> None:
    torch.manual_seed(0)
    vit = BACKBONES.build("vit_tiny", in_channels=1, image_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2)
    teacher = BACKBONES.build("convnet", in_channels=1, image_size=16, width=8).requires_grad_(False).eval()
    method = VQKDTokenizerMethod(
        vit, teacher=teacher, codebook_size=32, code_dim=4, decoder_depth=1, decoder_num_heads=2
    )
    x = smooth_images(12, seed=3)
    modes = record_modes(method.decoder)
    got = method.evaluate_tokens(chunks(x, 5))
    assert modes and not any(modes) and method.training and not method.teacher.training
    want = reference(method, x, method.tokenizer.tokenize(x), 32)
    assert_metrics_close(got, want)
    assert 0 < got["tokenizer_reconstruction"] < 2  # 1 - cos lies in [0, 2]


def test_a_method_that_is_no_tokenizer_returns_nothing_and_reads_no_images() -> None:
    def never() -> Iterator[Tensor]:
        raise AssertionError("read the images")
        yield torch.zeros(1)

    assert Method().evaluate_tokens(never()) == {}


# --------------------------------------------------------------------------- runs and the CLI

TINY_TOKENIZER = [
    "data.limit=256",
    "train.batch_size=32",
    "train.max_steps=3",
    "optim.name=adamw",
    "optim.lr=0.003",
    "optim.warmup_epochs=0",
    "method.patch_size=2",
    "method.hidden_dim=8",
    "method.code_dim=8",
    "method.codebook_size=16",
]


def config(tmp_path: Path, method: str, name: str, *overrides: str, vit: bool = False) -> Config:
    tree = tiny_config(tmp_path, method).to_dict()
    if vit:
        tree["backbone"] = {"name": "vit_tiny"}
    return from_dict(apply_overrides(tree, [f"run.name={name}", *overrides]))


def results(run_dir: Path) -> dict[str, dict[str, Any]]:
    loaded: dict[str, dict[str, Any]] = json.loads((run_dir / "results.json").read_text())
    return loaded


KEYS = ("tokenizer_reconstruction", "codebook_usage", "codebook_perplexity", "codebook_size")


def test_final_evaluation_and_eval_tokenizer_write_the_same_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(
        tmp_path, "vq_tokenizer", "tok", *TINY_TOKENIZER, "eval.at_end=true", "eval.linear=false", "eval.knn_k=[20]"
    )
    run = PretrainRun(cfg)
    run.fit()
    first_row, *others = results(run.run_dir)
    final = results(run.run_dir)[first_row]
    assert first_row == "vq_tokenizer (convnet)" and all(k in final for k in ("knn_top1@20", *KEYS))
    assert final["codebook_size"] == 16 and 0 < final["codebook_usage"] <= 1
    assert "codes used" in (run.run_dir / "results.txt").read_text()

    # The CLI on the finished run (its checkpoint): same numbers, added to the run's own row,
    # every other metric and row kept.
    stripped = {row: {k: v for k, v in m.items() if k not in KEYS} for row, m in results(run.run_dir).items()}
    stripped["raw pixels"] = {"knn_top1@20": 0.5}
    (run.run_dir / "results.json").write_text(json.dumps(stripped))
    capsys.readouterr()
    assert cli_main(["eval", "tokenizer", str(run.run_dir)]) == 0
    assert "added to" in capsys.readouterr().out
    after = results(run.run_dir)
    assert list(after) == [first_row, *others, "raw pixels"]
    for key in KEYS:
        assert math.isclose(after[first_row][key], final[key], rel_tol=1e-6), key
    assert after[first_row]["knn_top1@20"] == final["knn_top1@20"] and after["raw pixels"] == {"knn_top1@20": 0.5}

    # A run without results.json (eval.at_end=false) gets one holding its tokenizer row.
    bare = PretrainRun(config(tmp_path, "vq_tokenizer", "bare", *TINY_TOKENIZER))
    bare.fit()
    assert not (bare.run_dir / "results.json").exists()
    assert cli_main(["eval", "tokenizer", str(bare.run_dir / "checkpoints" / "last.pt")]) == 0
    assert set(results(bare.run_dir)["vq_tokenizer (convnet)"]) == set(KEYS)


def test_eval_tokenizer_on_a_vqkd_run_and_a_one_line_error_for_other_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    teacher = PretrainRun(config(tmp_path, "simclr", "teacher", "data.limit=128", "train.max_steps=1"))
    teacher.fit()
    vit = ["backbone.patch_size=2", "backbone.embed_dim=16", "backbone.depth=1"]
    vqkd = PretrainRun(
        config(
            tmp_path,
            "vqkd_tokenizer",
            "vqkd",
            *TINY_TOKENIZER[:6],
            *vit,
            "backbone.num_heads=2",
            f"method.teacher={teacher.run_dir}",
            "method.codebook_size=16",
            "method.code_dim=8",
            "method.decoder_depth=1",
            "method.decoder_num_heads=2",
            vit=True,
        )
    )
    vqkd.fit()
    assert cli_main(["eval", "tokenizer", str(vqkd.run_dir), "--json"]) == 0
    metrics = results(vqkd.run_dir)["vqkd_tokenizer (vit_tiny)"]
    assert metrics["codebook_size"] == 16 and 0 < metrics["tokenizer_reconstruction"] < 2
    capsys.readouterr()
    assert cli_main(["eval", "tokenizer", str(teacher.run_dir)]) == 2
    err = capsys.readouterr().err
    assert "not a visual tokenizer" in err and err.count("\n") == 1


# --------------------------------------------------------------------------------- the report


def report_run(root: Path, name: str, method: str, metrics: dict[str, float], epochs: int = 4) -> Path:
    run = root / name
    run.mkdir(parents=True)
    row = {"knn_top1@20": 0.8, "feature_std": 0.02, "effective_rank": 30.0, **metrics}
    (run / "results.json").write_text(json.dumps({f"{method} (convnet)": row, "raw pixels": {"knn_top1@20": 0.85}}))
    tree = {
        "data": {"name": "fashion-mnist"},
        "backbone": {"name": "convnet"},
        "method": {"name": method, "codebook_size": int(metrics.get("codebook_size", 512))},
        "train": {"epochs": epochs, "seed": 0, "threads": 2},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(tree))
    info = {"command": f"selfsup pretrain configs/{method}/fashion_mnist.yaml", "wall_seconds": 383.0, "threads": 2}
    (run / "run_info.json").write_text(json.dumps(info))
    return run


VQ = {
    "tokenizer_reconstruction": 0.04123,
    "codebook_usage": 0.9354,
    "codebook_perplexity": 301.24,
    "codebook_size": 512,
}
VQKD = {"tokenizer_reconstruction": 0.2871, "codebook_usage": 0.5, "codebook_perplexity": 88.0, "codebook_size": 512}


def test_report_renders_tokenizer_runs_in_their_own_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vq = report_run(tmp_path, "vq", "vq_tokenizer", VQ)
    vqkd = report_run(tmp_path, "vqkd", "vqkd_tokenizer", VQKD, epochs=2)
    simclr = report_run(tmp_path, "simclr", "simclr", {})
    assert report_main([str(vq), str(vqkd)]) == 0  # every run a tokenizer: their table
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "| method | reconstruction | codebook usage (%) | perplexity | codes | epochs | wall time | command |"
    )
    assert lines[2] == (
        "| vq_tokenizer | 0.0412 | 93.5 | 301.2 | 512 | 4 | 6m23s, 2 threads "
        "| `selfsup pretrain configs/vq_tokenizer/fashion_mnist.yaml` |"
    )
    assert lines[3].startswith("| vqkd_tokenizer | 0.2871 | 50.0 | 88.0 | 512 | 2 |")
    assert "cosine" in lines[5] and "test split of fashion-mnist" in lines[5]

    # With another run the methods table stays as it was; --table chooses.
    assert report_main([str(vq), str(simclr)]) == 0
    out = capsys.readouterr().out
    assert "kNN@20" in out and "reconstruction" not in out
    assert report_main([str(vq), "--table", "methods"]) == 0
    assert "kNN@20" in capsys.readouterr().out
    assert report_main([str(vq), str(simclr), "--table", "tokenizers"]) == 2
    assert "selfsup eval tokenizer" in capsys.readouterr().err

    doc = tmp_path / "results.md"
    doc.write_text("# Tokenizers\n<!-- results:tokenizers:begin -->\n<!-- results:tokenizers:end -->\nAfter.\n")
    assert report_main([str(vq), str(vqkd), "--update", str(doc), "--marker", "tokenizers"]) == 0
    text = doc.read_text()
    assert "| vq_tokenizer | 0.0412 |" in text and text.endswith("After.\n")
