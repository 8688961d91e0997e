"""SimCLR v2: the head's middle layer as the encoder, label fractions, distillation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from selfsup.cli import main
from selfsup.config import ConfigError
from selfsup.engine.build import build_components, build_views
from selfsup.engine.distill import distill_rows, distill_student
from selfsup.engine.finetune import finetune_model, top1
from selfsup.engine.run import PretrainRun
from selfsup.eval.semi_supervised import semi_supervised_subsets
from selfsup.losses import soft_target_distillation_loss
from selfsup.methods.simclr import SimCLR
from selfsup.nn.backbones.convnet import ConvNet
from tests.conftest import tiny_config

V2 = ("method.proj_layers=3", "method.eval_features=head_middle", "method.proj_hidden_dim=24", "method.proj_dim=8")


@pytest.mark.parametrize("tau", [1.0, 0.5, 4.0])
def test_distillation_loss_matches_float64_formula(tau: float) -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    got = soft_target_distillation_loss(student, teacher, tau)
    total = 0.0
    for i in range(5):
        t = [math.exp(float(v) / tau) for v in teacher[i].double()]
        s = [math.exp(float(v) / tau) for v in student[i].double()]
        for y in range(7):
            total -= t[y] / sum(t) * math.log(s[y] / sum(s))
    assert float(got) == pytest.approx(total / 5, rel=1e-6)
    # Minimised where the student's distribution equals the teacher's: the teacher's entropy.
    assert float(soft_target_distillation_loss(teacher, teacher, tau)) < float(got)
    student.requires_grad_(True)
    soft_target_distillation_loss(student, teacher.requires_grad_(True), tau).backward()
    assert teacher.grad is None and student.grad is not None  # the teacher's targets are fixed


def test_label_fractions_are_class_balanced_and_seeded() -> None:
    labels = torch.arange(10).repeat_interleave(torch.tensor([100, 200, 300, 100, 100, 150, 100, 100, 100, 100]))
    labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))]
    subsets = semi_supervised_subsets(labels, (0.01, 0.1), seed=3)
    for fraction, idx in subsets.items():
        counts = torch.bincount(labels[idx], minlength=10)
        want = torch.round(torch.bincount(labels).double() * fraction).long()
        assert torch.equal(counts, want)
    assert torch.equal(semi_supervised_subsets(labels, (0.1,), seed=3)[0.1], subsets[0.1])
    assert not torch.equal(semi_supervised_subsets(labels, (0.1,), seed=4)[0.1], subsets[0.1])
    with pytest.raises(ValueError, match="leaves class 0"):
        semi_supervised_subsets(labels, (0.001,))


def test_simclr_v2_evaluates_the_heads_middle_layer() -> None:
    backbone = ConvNet(in_channels=1, width=4)
    method = SimCLR(backbone, proj_hidden_dim=12, proj_dim=6, proj_layers=3, eval_features="head_middle").eval()
    x = torch.rand(3, 1, 8, 8)
    want = torch.relu(method.projector[1](method.projector[0](backbone(x))))
    torch.testing.assert_close(method.embed(x), want)
    assert method.num_features == 12 and method.embed(x).shape == (3, 12)
    module, spec = method.embedder()
    assert spec is not None
    rebuilt = SimCLR.build_embedder(spec, lambda: ConvNet(in_channels=1, width=4))
    rebuilt.load_state_dict(module.state_dict())  # same names and shapes: what exports reload
    torch.testing.assert_close(rebuilt.eval()(x), want)
    assert SimCLR(ConvNet(in_channels=1, width=4)).num_features == backbone.num_features
    with pytest.raises(ConfigError, match="proj_layers >= 2"):
        SimCLR(backbone, proj_layers=1, eval_features="head_middle")
    with pytest.raises(ConfigError, match="eval_features"):
        SimCLR(backbone, eval_features="head")


def test_student_learns_the_teacher_and_the_teacher_stays_fixed(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "simclr")
    parts = build_components(cfg, torch.device("cpu"))
    splits = parts.splits
    views = build_views(cfg, splits, "single_view")
    encoder = ConvNet(in_channels=1, width=8)
    teacher, _ = finetune_model(
        encoder, encoder.num_features, splits.train, 10, train_views=views, epochs=3, batch_size=64, lr=1e-2
    )
    teacher_top1 = top1(teacher, splits.test, parts.eval_views, torch.device("cpu"), 256)
    assert teacher_top1 > 0.3
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = distill_student(
        teacher, ConvNet(in_channels=1, width=8), splits.train, 10, train_views=views, epochs=3, batch_size=64, lr=1e-2
    )
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert all(not p.requires_grad for p in teacher.parameters())
    # The student never saw a label, yet classifies well above chance (0.1) by imitation.
    assert top1(student, splits.test, parts.eval_views, torch.device("cpu"), 256) > 0.6 * teacher_top1


def test_distill_command_writes_the_table_and_refuses_a_class_without_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config(tmp_path, "simclr", *V2, "train.max_steps=2")
    run = PretrainRun(cfg)
    run.fit()
    code = main(
        ["distill", str(run.run_dir), "eval.finetune_epochs=2", "eval.semi_fractions=[0.1,0.3]", "--epochs", "1"]
        + ["--student-backbone", "{name: convnet, width: 4}"]
    )
    assert code == 0
    results = json.loads((run.run_dir / "results.json").read_text())
    rows = {
        "supervised from scratch (convnet)",
        "simclr (convnet) fine-tuned",
        "simclr distilled into convnet width=4",
    }
    assert rows <= set(results)
    assert all(set(results[r]) == {"semi_top1@10%", "semi_top1@30%"} for r in rows)
    capsys.readouterr()
    assert main(["distill", str(run.run_dir), "eval.semi_fractions=[0.001]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "without a label" in err[0] and "eval.semi_fractions" in err[0]
    with pytest.raises(ConfigError, match="not a backbone mapping"):
        from selfsup.cli import _cmd_distill, parse_args

        _cmd_distill(parse_args(["distill", str(run.run_dir), "--student-backbone", "[1, 2]"]))


def test_distill_rows_default_student_is_the_teachers_architecture(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "simclr", *V2, "eval.finetune_epochs=1", "eval.semi_fractions=[0.1]")
    parts = build_components(cfg, torch.device("cpu"))
    rows = distill_rows(
        parts.method, cfg, parts.splits, parts.eval_views, torch.device("cpu"), precision=parts.precision, epochs=1
    )
    assert set(rows) == {
        "supervised from scratch (convnet)",
        "simclr (convnet) fine-tuned",
        "simclr distilled into convnet",
    }
    assert all(0.0 <= v["semi_top1@10%"] <= 1.0 for v in rows.values())
