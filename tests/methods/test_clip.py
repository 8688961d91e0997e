"""CLIP: the method's loss and logit-scale clamp against CLIP's formula in float64, the BPE
tokenizer, end-of-text pooling under padding, zero-shot and retrieval scoring, a tiny run
through the engine whose image->text Recall@1 rises well above chance, and bad input."""

from __future__ import annotations

import builtins
import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from selfsup.cli import main
from selfsup.config import ConfigError
from selfsup.engine.build import build_components
from selfsup.engine.run import PretrainRun
from selfsup.engine.zeroshot import image_text_rows, merge_results, text_retrieval_rows
from selfsup.eval.zeroshot import build_prompts, check_class_names, image_text_recall, prompt_ensemble, zeroshot_top1
from selfsup.methods.base import Batch, StepInfo
from selfsup.methods.clip import CLIP
from selfsup.nn.text import BPETokenizer, TextTransformer, pool_eot
from selfsup.registry import BACKBONES
from tests.conftest import tiny_config

CAPTIONS = ["a small red circle", "a large striped blue star", "an image of a small green cross", "héllo wörld ✓"]


def _clip(**kwargs: Any) -> CLIP:
    backbone = BACKBONES.build("convnet", in_channels=3, image_size=16, width=8)
    options = {"proj_dim": 16, "context_length": 16, "vocab_size": 300, "text_width": 32, "text_depth": 1,
               "text_heads": 2, **kwargs}  # fmt: skip
    return CLIP(backbone, captions=CAPTIONS * 4, **options)


def test_training_loss_and_scale_clamp_match_the_float64_formula() -> None:
    method = _clip()
    images = torch.rand(4, 3, 16, 16)
    batch = Batch(views=[images], index=torch.arange(4), text=CAPTIONS)
    step = StepInfo(step=0, total_steps=1, epoch=0.0)
    for log_scale in (math.log(1 / 0.07), math.log(1000.0)):  # the second is clipped at 100
        with torch.no_grad():
            method.logit_scale.fill_(log_scale)
        loss = method.training_step(batch, step)["loss"]
        with torch.no_grad():
            img = method.image_features(images).double()
            txt = method.text_features(CAPTIONS, images.device).double()
        img = img / img.norm(dim=1, keepdim=True)
        txt = txt / txt.norm(dim=1, keepdim=True)
        logits = min(math.exp(log_scale), 100.0) * img @ txt.T
        # CLIP's Figure 3: mean over images of -log softmax over texts, and vice versa, averaged.
        expected = 0.0
        for i in range(4):
            expected += -logits[i, i] + torch.logsumexp(logits[i], 0)
            expected += -logits[i, i] + torch.logsumexp(logits[:, i], 0)
        expected = expected / 8
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    method.on_step_end(step, {})  # the parameter itself is clipped to log(100)
    assert float(method.logit_scale.detach()) == pytest.approx(math.log(100.0))
    fresh = _clip()
    assert float(fresh.logit_scale.detach().exp()) == pytest.approx(1 / 0.07)


def test_tokenizer_round_trips_and_truncates_keeping_end_of_text() -> None:
    tok = BPETokenizer.train(CAPTIONS * 3, vocab_size=300, context_length=40)
    ids = tok.encode(CAPTIONS)
    assert ids.shape == (4, 40) and (ids[:, 0] == tok.sot_id).all()
    assert tok.decode(ids) == CAPTIONS
    assert tok.decode(tok.encode(["an unseen sentence, with ünïcode"])) == ["an unseen sentence, with ünïcode"]
    again = BPETokenizer.from_json(tok.to_json())
    assert torch.equal(again.encode(CAPTIONS), ids)
    assert BPETokenizer.train(CAPTIONS * 3, 300, 40).to_json() == tok.to_json()  # deterministic
    long = tok.encode(["a small red circle " * 20])
    assert long[0, -1] == tok.eot_id and (long[0] != tok.pad_id).all()


def test_checkpoint_carries_the_vocabulary() -> None:
    """A checkpoint re-tokenises exactly: its vocabulary replaces the one built from (here
    other) captions, so evaluation of a saved run never depends on rebuilding it identically."""
    a = _clip()
    backbone = BACKBONES.build("convnet", in_channels=3, image_size=16, width=8)
    b = CLIP(backbone, captions=["completely different words"] * 8, proj_dim=16, context_length=16, vocab_size=300,
             text_width=32, text_depth=1, text_heads=2)  # fmt: skip
    assert b.tokenizer.to_json() != a.tokenizer.to_json()
    b.load_state_dict(a.state_dict())
    assert b.tokenizer.to_json() == a.tokenizer.to_json()
    assert torch.equal(b.tokenize(CAPTIONS, torch.device("cpu")), a.tokenize(CAPTIONS, torch.device("cpu")))


def test_end_of_text_pooling_ignores_padding() -> None:
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    ids = torch.tensor([[1, 7, 2, 0, 0], [1, 7, 8, 9, 2]])
    assert torch.equal(pool_eot(hidden, ids, eot_id=2), torch.stack([hidden[0, 2], hidden[1, 4]]))
    torch.manual_seed(0)
    text = TextTransformer(vocab_size=20, context_length=10, width=16, depth=2, num_heads=2, out_dim=8).eval()
    short = torch.tensor([[1, 5, 6, 2]])
    padded = torch.tensor([[1, 5, 6, 2, 0, 0, 0, 0, 0, 0]])
    noisy = torch.tensor([[1, 5, 6, 2, 9, 13, 4, 11, 3, 7]])  # anything after <eot> is unseen
    with torch.no_grad():
        out = text(short)
        torch.testing.assert_close(text(padded), out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(text(noisy), out, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(text(torch.tensor([[1, 5, 7, 2]])), out)
    with pytest.raises(ValueError, match="end-of-text"):
        text(torch.tensor([[1, 5, 6, 0]]))


def test_zeroshot_with_identity_features_is_perfect_and_duplicate_names_fail() -> None:
    names = ["red circle", "blue star", "green cross"]
    templates = ["a {}", "a small {}"]
    prompts = build_prompts(names, templates)
    assert prompts[:2] == ["a red circle", "a small red circle"]
    # A perfect encoder pair: class c's prompts and images are all the basis vector e_c.
    prompt_emb = torch.eye(3).repeat_interleave(2, 0) + 0.01 * torch.randn(6, 3)
    weights = prompt_ensemble(prompt_emb, 3)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    assert zeroshot_top1(torch.eye(3)[labels], weights, labels) == 1.0
    with pytest.raises(ValueError, match="'Red circle' occurs twice"):
        check_class_names(["red circle", "Red circle"])
    with pytest.raises(ValueError, match="must each contain"):
        build_prompts(names, ["no slot"])


def test_image_text_recall_matches_a_plain_float64_count() -> None:
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(20, 8, generator=g), torch.randn(12, 8, generator=g)
    relevant = torch.zeros(20, 12, dtype=torch.bool)
    relevant[torch.arange(20), torch.arange(20) % 12] = True  # texts shared by several images
    relevant[3, 5] = True
    got = image_text_recall(images, texts, relevant, ks=(1, 5))
    sim = F.normalize(images.double(), dim=1) @ F.normalize(texts.double(), dim=1).T
    for k in (1, 5):
        i2t = sum(bool(relevant[i, sim[i].argsort(descending=True)[:k]].any()) for i in range(20)) / 20
        t2i = sum(bool(relevant[sim[:, j].argsort(descending=True)[:k], j].any()) for j in range(12)) / 12
        assert got[f"i2t_recall@{k}"] == pytest.approx(i2t)
        assert got[f"t2i_recall@{k}"] == pytest.approx(t2i)
    perfect = image_text_recall(torch.eye(4), torch.eye(4), torch.eye(4, dtype=torch.bool), ks=(1,))
    assert perfect == {"i2t_recall@1": 1.0, "t2i_recall@1": 1.0}


def _config(tmp_path: Path, *overrides: str) -> Any:
    """A tiny CLIP run on scenes (the ``data.*`` overrides may name another data set)."""
    data = [o for o in overrides if o.startswith("data.")] or [
        "data.name=scenes",
        "data.num_train=512",
        "data.num_test=128",
        "data.image_size=16",
        "data.max_objects=1",
        "data.label=color",
        "data.hold_out=['green triangle']",
    ]
    return tiny_config(
        tmp_path,
        "clip",
        *data,
        "views.name=single_view",
        "views.crop_scale=[0.8,1.0]",
        "views.flip_p=0.0",
        "method.proj_dim=32",
        "method.context_length=16",
        "method.vocab_size=300",
        "method.text_width=32",
        "method.text_depth=1",
        "method.text_heads=2",
        "optim.name=adamw",
        "optim.lr=0.003",
        "optim.lr_scaling=none",
        "optim.weight_decay=0.0001",
        *[o for o in overrides if not o.startswith("data.")],
    )


COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 220), "yellow": (220, 210, 40)}


def _colour_folder(root: Path, n: int = 128) -> Path:
    """``n`` noisy one-colour 8 px images with two captions each and a colour label (JSONL)."""
    g = torch.Generator().manual_seed(0)
    root.mkdir()
    lines = []
    for i in range(n):
        name = list(COLOURS)[i % len(COLOURS)]
        pixels = torch.tensor(COLOURS[name]).view(1, 1, 3) + torch.randint(-40, 41, (8, 8, 3), generator=g)
        Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).numpy()).save(root / f"{i}.png")
        lines.append(json.dumps({"path": f"{i}.png", "captions": [f"a {name} picture", f"all {name}"], "label": name}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root / "captions.jsonl"


@pytest.mark.slow  # ~8 s alone, ~20 s on a loaded machine (a run, two evaluations, the CLI)
def test_tiny_run_on_a_caption_folder_learns_image_text_retrieval(tmp_path: Path) -> None:
    """Caption file -> loader -> loop (one sampled caption per image and epoch) -> retrieval."""
    file = _colour_folder(tmp_path / "colours")
    cfg = _config(
        tmp_path, "data.name=captions", f"data.file={file}", "data.image_size=8", "data.test_fraction=0.25",
        "train.epochs=4", "train.batch_size=16", "optim.warmup_epochs=0.5",
    )  # fmt: skip
    run = PretrainRun(cfg)
    splits, device = run.parts.splits, torch.device("cpu")
    before = text_retrieval_rows(run.method, cfg, splits, run.parts.eval_views, device)["clip (convnet)"]
    run.fit()
    assert (run.run_dir / "tokenizer.json").is_file()
    after = image_text_rows(run.method, cfg, splits, run.parts.eval_views, device, run.run_dir)["clip (convnet)"]
    assert (run.run_dir / "retrieval_examples.png").is_file()
    assert after["retrieval_texts"] == 8  # two captions of each of the four colours
    chance = 2 / 8
    assert after["i2t_recall@1"] > max(2.5 * chance, before["i2t_recall@1"] + 0.2), (before, after)
    assert after["zeroshot_top1"] > 2 * after["zeroshot_chance"], after  # prompts "a photo of a red." etc.
    path = merge_results(run.run_dir, {"clip (convnet)": after})
    assert "zeroshot_top1" in path.read_text()
    # The command reloads the run (tokenizer from the checkpoint) and gets the same numbers.
    path.unlink()
    assert main(["eval", "zeroshot", str(run.run_dir)]) == 0
    saved = json.loads(path.read_text())["clip (convnet)"]
    assert saved["zeroshot_top1"] == pytest.approx(after["zeroshot_top1"])


def test_bad_input_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    with caplog.at_level(logging.WARNING, logger="selfsup.methods.clip"):
        _clip(context_length=5)
    assert "of 16 training captions have more than 3 tokens" in caplog.text
    with pytest.raises(ConfigError, match="needs batch field.*text"):
        build_components(tiny_config(tmp_path, "clip"), torch.device("cpu"))  # digits: no captions
    real_import = builtins.__import__

    def no_tokenizers(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "tokenizers":
            raise ImportError("No module named 'tokenizers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tokenizers)
    with pytest.raises(ConfigError, match=r"pip install selfsup\[clip\]"):
        build_components(_config(tmp_path), torch.device("cpu"))
