"""BEiT / BEiT v2 and their tokenizers: the masked-token cross-entropy against float64, masking,
tokenizer training (reconstruction falls, codebook stays in use), VQ-KD distillation, the
engine chain tokenizer run -> BEiT run, the reconstruction figure, and the one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from selfsup.config import Config, ConfigError, apply_overrides, from_dict
from selfsup.engine.build import build_components
from selfsup.engine.run import PretrainRun
from selfsup.methods.base import Batch, StepInfo
from selfsup.methods.beit import BEiT, masked_token_loss
from selfsup.methods.vq_tokenizer import VQTokenizer, VQVAETokenizer
from selfsup.methods.vqkd_tokenizer import VQKDTokenizerMethod, cosine_reconstruction_loss
from selfsup.registry import BACKBONES
from tests.conftest import tiny_config


def info(step: int = 0) -> StepInfo:
    return StepInfo(step=step, total_steps=100, epoch=0.0, lr=1e-3)


def smooth_images(batch: int, size: int = 16, seed: int = 0) -> Tensor:
    """Normalised smooth random images `(B, 1, S, S)` (4x4 noise upsampled)."""
    coarse = torch.rand(batch, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    return (torch.nn.functional.interpolate(coarse, size=size, mode="bilinear") - 0.5) / 0.25


def vit() -> torch.nn.Module:
    return BACKBONES.build("vit_tiny", in_channels=1, image_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)


def vq_tokenizer(**kw: object) -> VQVAETokenizer:
    return VQVAETokenizer(in_channels=1, image_size=16, patch_size=4, hidden_dim=16, code_dim=8, **kw)  # type: ignore[arg-type]


def train(method: torch.nn.Module, steps: int, lr: float = 3e-3) -> list[dict[str, float]]:
    """Adam steps on fresh smooth images, with the codebook EMA in on_step_end."""
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=lr)
    logs = []
    for step in range(steps):
        x = smooth_images(16, seed=step)
        out = method.training_step(Batch(views=[x], index=torch.arange(16)), info(step))  # type: ignore[operator]
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        method.on_step_end(info(step), {k: v.detach() for k, v in out.items() if v.ndim})  # type: ignore[operator]
        logs.append({k: float(v.detach()) for k, v in out.items() if not v.ndim})
    return logs


def mean(logs: list[dict[str, float]], key: str) -> float:
    return sum(log[key] for log in logs) / len(logs)


# ---------------------------------------------------------------------------- the objective


def test_masked_token_loss_matches_float64_cross_entropy_on_masked_positions() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    ids = torch.randint(0, 7, (3, 5))
    mask = torch.rand(3, 5) < 0.5
    terms = []
    for b in range(3):
        for i in range(5):
            if mask[b, i]:
                row = logits[b, i].double()
                terms.append(math.log(row.exp().sum()) - float(row[ids[b, i]]))
    expected = sum(terms) / len(terms)
    assert math.isclose(float(masked_token_loss(logits, ids, mask)), expected, rel_tol=1e-6)
    # Scoring only the masked rows (what training_step does) is the same loss.
    assert math.isclose(float(masked_token_loss(logits[mask], ids, mask)), expected, rel_tol=1e-6)


def test_beit_step_predicts_the_tokenizers_ids_at_blockwise_masked_positions() -> None:
    tokenizer = vq_tokenizer(codebook_size=16).requires_grad_(False).eval()
    method = BEiT(vit(), tokenizer=tokenizer)
    x = smooth_images(8)
    torch.manual_seed(3)
    out = method.training_step(Batch(views=[x], index=torch.arange(8)), info())
    torch.manual_seed(3)
    mask = method.sample_mask(8, x.device)
    assert (mask.sum(1) == round(0.4 * 16)).all()  # ~40%, exactly per image
    expected = masked_token_loss(method.logits(x, mask), tokenizer.tokenize(x), mask)
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    assert all(p.grad is None for p in tokenizer.parameters())
    assert method.backbone.mask_token.grad is not None


def test_beit_rejects_a_wrong_tokenizer_in_one_line() -> None:
    with pytest.raises(ValueError, match="needs method.tokenizer"):
        BEiT(vit())
    with pytest.raises(ValueError, match="not a tokenizer"):
        BEiT(vit(), tokenizer=vit())
    coarse = VQVAETokenizer(in_channels=1, image_size=16, patch_size=8, hidden_dim=8, codebook_size=16)
    with pytest.raises(ValueError, match="8 px patches on a 2x2 grid") as err:
        BEiT(vit(), tokenizer=coarse)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="codebook_size=32 but .* has 16 codes"):
        BEiT(vit(), tokenizer=vq_tokenizer(codebook_size=16), codebook_size=32)


def test_vqkd_cosine_loss_matches_float64() -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    terms = []
    for b in range(2):
        for i in range(3):
            p, t = pred[b, i].double(), target[b, i].double()
            terms.append(1 - float(p @ t) / float(p.norm() * t.norm()))
    assert math.isclose(float(cosine_reconstruction_loss(pred, target)), sum(terms) / 6, rel_tol=1e-5)


# ------------------------------------------------------------------------------ tokenizers


def test_vq_tokenizer_training_lowers_reconstruction_error_and_uses_many_codes() -> None:
    torch.manual_seed(0)
    method = VQTokenizer(in_channels=1, image_size=16, patch_size=4, hidden_dim=16, code_dim=8, codebook_size=32)
    before = method.tokenizer.quantizer.codebook.clone()
    logs = train(method, 40)
    assert mean(logs[-5:], "reconstruction_loss") < 0.5 * mean(logs[:5], "reconstruction_loss"), logs
    assert mean(logs[-5:], "perplexity") > 4.0  # not collapsed onto one code
    assert not torch.equal(method.tokenizer.quantizer.codebook, before)  # the EMA moved it
    x = smooth_images(4, seed=99)
    assert method.tokenizer.tokenize(x).shape == (4, 16)
    unquantised, decoded = method.reconstruct(x)
    assert unquantised.shape == decoded.shape == x.shape


def test_vqkd_tokenizer_distils_a_frozen_teachers_patch_features() -> None:
    torch.manual_seed(0)
    teacher = BACKBONES.build("convnet", in_channels=1, image_size=16, width=8).requires_grad_(False).eval()
    method = VQKDTokenizerMethod(
        vit(), teacher=teacher, codebook_size=32, code_dim=8, decoder_depth=1, decoder_num_heads=2
    )
    targets = method.teacher_targets(smooth_images(2))
    assert targets.shape == (2, 16, teacher.num_features)  # resized onto the 4x4 patch grid
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    logs = train(method, 30)
    assert mean(logs[-5:], "reconstruction_loss") < 0.5 * mean(logs[:5], "reconstruction_loss"), logs
    assert mean(logs[-5:], "perplexity") > 2.0
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    torch.testing.assert_close(method.quantizer.codebook.norm(dim=1), torch.ones(32))
    # What backbone.safetensors holds rebuilds into the same tokenizer.
    module, spec = method.embedder()
    rebuilt = VQKDTokenizerMethod.build_embedder(spec, vit)
    rebuilt.load_state_dict(module.state_dict())
    x = smooth_images(4, seed=5)
    assert torch.equal(rebuilt.tokenize(x), method.tokenizer.tokenize(x))  # type: ignore[operator]
    with pytest.raises(ValueError, match="needs method.teacher"):
        VQKDTokenizerMethod(vit())


# --------------------------------------------------------------------------- engine chain

# 8 px digits, 2 px patches: a 4x4 grid for the tokenizer and the ViT.
VIT_RUN = [
    "backbone.name=vit_tiny",
    "backbone.patch_size=2",
    "backbone.embed_dim=16",
    "backbone.depth=1",
    "backbone.num_heads=2",
    *(OPTIM := ["data.limit=256", "train.batch_size=32", "train.epochs=10", "optim.name=adamw", "optim.lr=0.003"]),
    "optim.warmup_epochs=0",
]
TOKENIZER = ["method.patch_size=2", "method.hidden_dim=8", "method.code_dim=8", "method.codebook_size=16"]


def config(tmp_path: Path, method: str, name: str, *overrides: str, vit_backbone: bool = True) -> Config:
    tree = tiny_config(tmp_path, method).to_dict()
    if vit_backbone:
        tree["backbone"] = {"name": "vit_tiny"}
    base = VIT_RUN if vit_backbone else [*OPTIM, "optim.warmup_epochs=0"]
    return from_dict(apply_overrides(tree, [*base, f"run.name={name}", *overrides]))


def losses(run_dir: Path, key: str = "loss") -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if key in r]


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("runs")
    run = PretrainRun(config(tmp, "vq_tokenizer", "tok", "train.max_steps=16", *TOKENIZER, vit_backbone=False))
    run.fit()
    assert (run.run_dir / "backbone.safetensors").is_file()
    return run.run_dir


def test_tokenizer_run_logs_codebook_use_and_draws_reconstructions(tokenizer_run: Path, tmp_path: Path) -> None:
    from selfsup.visualize import reconstruction_grid

    rec = losses(tokenizer_run, "reconstruction_loss")
    assert rec[-1] < rec[0] and losses(tokenizer_run, "perplexity")[-1] > 1.0
    assert losses(tokenizer_run, "dead_codes")
    png = reconstruction_grid(tokenizer_run, [0, 1], tmp_path / "recon.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_beit_run_on_a_tokenizer_run_learns_its_tokens(tokenizer_run: Path, tmp_path: Path) -> None:
    run = PretrainRun(config(tmp_path, "beit", "beit", "train.max_steps=50", f"method.tokenizer={tokenizer_run}"))
    run.fit()
    loss, accuracy = losses(run.run_dir), losses(run.run_dir, "accuracy")
    assert sum(loss[-10:]) / 10 < sum(loss[:5]) / 5 - 0.05, loss
    assert sum(accuracy[-10:]) / 10 > 1.5 / 16, accuracy  # well above chance over 16 codes
    # The predicted tokens, decoded by the pixel tokenizer.
    from selfsup.visualize import reconstruction_grid

    png = reconstruction_grid(run.run_dir, [0, 1], tmp_path / "beit.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_beit_config_errors_name_the_tokenizer_run(tokenizer_run: Path, tmp_path: Path) -> None:
    def error(*overrides: str) -> str:
        with pytest.raises(ConfigError) as err:
            build_components(config(tmp_path, "beit", "bad", *overrides), torch.device("cpu"))
        message = str(err.value)
        assert "\n" not in message
        return message

    missing = tmp_path / "no-such-run"
    assert str(missing) in error(f"method.tokenizer={missing}")
    assert "needs method.tokenizer" in error()
    wrong_grid = error(f"method.tokenizer={tokenizer_run}", "backbone.patch_size=4")
    assert str(tokenizer_run) in wrong_grid and "patch" in wrong_grid
    wrong_size = error(f"method.tokenizer={tokenizer_run}", "method.codebook_size=8192")
    assert str(tokenizer_run) in wrong_size and "16 codes" in wrong_size


@pytest.mark.slow
def test_beit_v2_chain_teacher_run_vqkd_run_beit_run(tmp_path: Path) -> None:
    """BEiT v2 end to end: a ConvNet teacher run, a VQ-KD tokenizer distilling it, BEiT on it;
    and a run that is no tokenizer (the teacher) given as tokenizer is refused, naming it."""
    teacher = PretrainRun(config(tmp_path, "simclr", "teacher", "train.max_steps=2", vit_backbone=False))
    teacher.fit()
    vqkd = PretrainRun(
        config(
            tmp_path,
            "vqkd_tokenizer",
            "vqkd",
            "train.max_steps=12",
            f"method.teacher={teacher.run_dir}",
            "method.codebook_size=16",
            "method.code_dim=8",
            "method.decoder_depth=1",
            "method.decoder_num_heads=2",
        )
    )
    vqkd.fit()
    rec = losses(vqkd.run_dir, "reconstruction_loss")
    assert rec[-1] < rec[0]
    beit = PretrainRun(config(tmp_path, "beit", "beit2", "train.max_steps=4", f"method.tokenizer={vqkd.run_dir}"))
    beit.fit()
    assert all(math.isfinite(v) for v in losses(beit.run_dir))
    with pytest.raises(ConfigError, match="not a tokenizer") as err:
        build_components(config(tmp_path, "beit", "bad", f"method.tokenizer={teacher.run_dir}"), torch.device("cpu"))
    assert str(teacher.run_dir) in str(err.value)
