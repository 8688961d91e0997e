"""SEED: its loss against a float64 loop and closed forms, the frozen teacher and the queue through
the real loop, and a tiny teacher -> student run through the engine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.config import OptimConfig
from selfsup.engine.evaluation import evaluate_encoder
from selfsup.engine.loop import DataBatch, LoopSchedule, TrainingLoop
from selfsup.engine.optim import build_optimizer
from selfsup.engine.run import PretrainRun
from selfsup.losses import info_nce, seed_loss
from selfsup.methods.base import Batch, StepInfo
from selfsup.methods.seed import SEED
from selfsup.registry import BACKBONES, METHODS, VIEW_RECIPES
from tests.conftest import tiny_config


# ------------------------------------------------------------------------------ the loss
def _dot(a: Tensor, b: Tensor) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b))


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _log_softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    log_z = m + math.log(sum(math.exp(x - m) for x in xs))
    return [x - log_z for x in xs]


def ref_seed(student: Tensor, teacher: Tensor, queue: Tensor, ts: float, tt: float) -> float:
    """The paper's loss, sample by sample: cross-entropy of the teacher's over the student's
    softmax of similarities to D+ = [own teacher embedding, queue rows]."""
    total = 0.0
    for i in range(student.shape[0]):
        keys = [teacher[i]] + [queue[k] for k in range(queue.shape[0])]
        p_t = _softmax([_dot(teacher[i], d) / tt for d in keys])
        log_p_s = _log_softmax([_dot(student[i], d) / ts for d in keys])
        total -= sum(p * lp for p, lp in zip(p_t, log_p_s))
    return total / student.shape[0]


def _unit(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


@pytest.mark.parametrize(("ts", "tt"), [(0.2, 0.05), (0.1, 0.3), (0.2, 1e-4)])
def test_seed_loss_matches_loops(ts: float, tt: float) -> None:
    s, t, q = _unit(4, 6), _unit(4, 6), _unit(5, 6)
    # Some queue rows close to teacher rows, so the teacher's targets are not one-hot.
    q[:2] = F.normalize(t[:2] + 0.05 * torch.randn(2, 6), dim=1)
    got = seed_loss(s, t, q, student_temperature=ts, teacher_temperature=tt)
    expected = ref_seed(s.double(), t.double(), q.double(), ts, tt)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_seed_loss_closed_forms() -> None:
    s, t, q = _unit(3, 5, dtype=torch.float64), _unit(3, 5, dtype=torch.float64), _unit(7, 5, dtype=torch.float64)
    # Student equal to teacher at equal temperatures: the cross-entropy is the entropy of p_T.
    for tau in (0.1, 0.5):
        entropy = 0.0
        for i in range(3):
            p = _softmax([_dot(t[i], d) / tau for d in [t[i], *q]])
            entropy -= sum(x * math.log(x) for x in p) / 3
        assert seed_loss(t, t, q, tau, tau).item() == pytest.approx(entropy, rel=1e-12)
    # A near-zero teacher temperature makes p_T one-hot on the own embedding (no queue row is
    # that close): InfoNCE of the student against its teacher embedding, the queue as negatives.
    expected = info_nce(s, t, negatives=q, temperature=0.2)
    torch.testing.assert_close(seed_loss(s, t, q, 0.2, 1e-4), expected, rtol=1e-12, atol=1e-12)
    # An empty queue leaves one candidate, certain for both: zero loss.
    assert seed_loss(s, t, q[:0], 0.2, 1e-4).item() == pytest.approx(0.0, abs=1e-12)


def test_seed_loss_runs_in_float32_under_autocast() -> None:
    s, t, q = _unit(4, 8), _unit(4, 8), _unit(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = seed_loss(s.bfloat16(), t.bfloat16(), q.bfloat16(), 0.2, 0.05)
    assert got.dtype == torch.float32
    expected = ref_seed(s.bfloat16().double(), t.bfloat16().double(), q.bfloat16().double(), 0.2, 0.05)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_seed_loss_gradcheck_and_no_gradient_to_teacher_or_queue() -> None:
    s = _unit(3, 4, dtype=torch.float64).requires_grad_(True)
    t = _unit(3, 4, dtype=torch.float64).requires_grad_(True)
    q = _unit(5, 4, dtype=torch.float64).requires_grad_(True)
    seed_loss(s, t, q, 0.2, 0.1).backward()
    assert s.grad is not None and t.grad is None and q.grad is None
    t_fixed, q_fixed = t.detach(), q.detach()
    assert torch.autograd.gradcheck(lambda x: seed_loss(x, t_fixed, q_fixed, 0.2, 0.1), (s.detach().requires_grad_(),))


def test_seed_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(B, D\) and queue \(K, D\)"):
        seed_loss(_unit(3, 4), _unit(3, 4), _unit(5, 6), 0.2, 0.1)


# ------------------------------------------------------------------------------ the method
def _convnet(width: int) -> nn.Module:
    return BACKBONES.build("convnet", in_channels=1, image_size=16, width=width)


def _seed(queue_size: int = 32) -> SEED:
    teacher = _convnet(16)  # wider than the student: the head maps 64 -> 128
    return SEED(_convnet(8), num_samples=256, teacher=teacher, queue_size=queue_size)


def _images(n: int = 8, generator: torch.Generator | None = None) -> Tensor:
    coarse = torch.rand(n, 1, 4, 4, generator=generator)
    return F.interpolate(coarse, size=16, mode="bilinear", align_corners=False)


def test_seed_needs_a_loaded_teacher_and_says_how() -> None:
    with pytest.raises(ValueError, match=r"method\.teacher.*method\.teacher=\{run: runs/<name>\}"):
        SEED(_convnet(8))
    with pytest.raises(ValueError, match=r"method\.teacher"):
        SEED(_convnet(8), teacher={"run": "runs/x"})


def test_seed_declarations_and_shapes() -> None:
    method = _seed()
    assert METHODS.get("seed") is SEED
    assert method.frozen_models == ("teacher",) and method.view_recipe == "single_view"
    assert not method.uses_ema
    assert all(not p.requires_grad for p in method.teacher.parameters())
    assert method.queue.queue.shape == (32, 128)  # the teacher's width
    assert method.num_features == 64 and method.eval_backbone is method.backbone
    method.train()
    assert method.training and method.backbone.training and not method.teacher.training
    assert SEED(_convnet(8), num_samples=1437, teacher=_convnet(8)).queue.size == 359  # MoCo v2's rule


def test_seed_queue_changes_only_in_on_step_end_and_holds_teacher_embeddings() -> None:
    method = _seed()
    views = VIEW_RECIPES.build("single_view", image_size=16, in_channels=1, mean=(0.5,), std=(0.25,))
    batch = Batch(views=views(_images()), index=torch.arange(8))
    info = StepInfo(step=0, total_steps=10, epoch=0.0)
    before = method.queue.queue.clone()
    out = method.training_step(batch, info)
    assert set(out) == {"loss", "teacher_cosine", "z_std", "teacher_keys"}
    assert out["loss"].ndim == 0 and out["teacher_cosine"].ndim == 0 and out["z_std"].ndim == 0
    assert -1.0 <= float(out["teacher_cosine"]) <= 1.0
    assert torch.equal(method.queue.queue, before), "the forward must not touch the queue"
    with torch.no_grad():
        expected = F.normalize(method.teacher(batch.views[0]), dim=1)
    torch.testing.assert_close(out["teacher_keys"], expected)
    method.on_step_end(info, out)
    assert torch.equal(method.queue.queue[:8], out["teacher_keys"])
    assert torch.equal(method.queue.queue[8:], before[8:])
    torch.testing.assert_close(method.queue.queue[:8].norm(dim=1), torch.ones(8))


def test_teacher_stays_frozen_and_queue_fills_through_the_real_loop() -> None:
    torch.manual_seed(0)
    method = _seed(queue_size=24)
    teacher_state = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    student_state = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    views = VIEW_RECIPES.build(method.view_recipe, image_size=16, in_channels=1, mean=(0.5,), std=(0.25,))
    optimizer = build_optimizer(method.param_groups(), OptimConfig(name="adamw"), lr=1e-3)
    schedule = LoopSchedule(total_steps=4, steps_per_epoch=2, peak_lr=1e-3)
    loop = TrainingLoop(method, optimizer, schedule, views, torch.device("cpu"), num_samples=64, accum_steps=2)
    seen: list[Tensor] = []
    queue_at_step_start: list[Tensor] = []
    original = method.training_step

    def spy(batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        seen.append(batch.views[0].clone())
        assert torch.equal(method.queue.queue, queue_at_step_start[-1]), "the queue moved inside the step"
        return original(batch, step)

    method.training_step = spy
    method.train()
    for step in range(4):
        queue_at_step_start.append(method.queue.queue.clone())
        g = torch.Generator().manual_seed(step)
        data = DataBatch(images=(_images(8, g) * 255).to(torch.uint8), index=torch.arange(8) + 8 * step)
        parts = loop.step(data, loop.step_info(step))
        assert math.isfinite(parts["loss"])
        assert all(p.grad is None for p in method.teacher.parameters())
        assert not method.teacher.training
    for key, value in method.teacher.state_dict().items():
        assert torch.equal(value, teacher_state[key]), f"the frozen teacher moved: {key}"
    assert any(not torch.equal(v, student_state[k]) for k, v in method.backbone.state_dict().items())
    # Steps 0-3 wrote 4 x 8 keys into 24 rows: the last 24 (steps 1-3), each the teacher's
    # normalised embedding of the view that step trained on (eval-mode teacher: per sample).
    with torch.no_grad():
        keys = torch.cat([F.normalize(method.teacher(v), dim=1) for v in seen])
    rows = (8 + torch.arange(24)) % 24
    torch.testing.assert_close(method.queue.queue[rows], keys[8:])
    assert int(method.queue.ptr) == 32 % 24 and int(method.queue.filled) == 24


# ------------------------------------------------------------------------------ end to end
def _logged_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def test_seed_distils_a_teacher_run_into_a_student_through_the_engine(tmp_path: Path) -> None:
    teacher_run = PretrainRun(
        tiny_config(tmp_path, "simclr", "train.epochs=3", "backbone.width=16", "run.name=teacher")
    )
    teacher_run.fit()
    # SGD as in the authors' code (tiny_config's default optimiser); milder crops than the
    # single view's default (0.08, 1) on 8 px digits.
    cfg = tiny_config(
        tmp_path,
        "seed",
        "train.epochs=3",
        "run.name=student",
        "views.crop_scale=[0.5, 1.0]",
        f"method.teacher={{run: {teacher_run.run_dir}}}",
    )
    run = PretrainRun(cfg)
    assert isinstance(run.method, SEED) and run.method.teacher.num_features == 128  # the teacher run's width 16
    run.fit()
    losses = _logged_losses(run.run_dir)
    # The queue holds random unit vectors until it first fills; compare from then on.
    full = math.ceil(run.method.queue.size / cfg.train.batch_size)
    assert sum(losses[-3:]) < 0.9 * sum(losses[full : full + 3]), losses

    splits, views = run.parts.splits, run.parts.eval_views
    torch.manual_seed(123)
    random_student = BACKBONES.build("convnet", in_channels=splits.in_channels, image_size=splits.image_size, width=8)

    def knn(encoder: nn.Module) -> dict[str, float]:
        return evaluate_encoder(
            encoder, encoder, splits.train, splits.test, splits.num_classes, views, cfg.eval, run.device, linear=False
        )

    trained, random_init = knn(run.method.backbone), knn(random_student)
    # Normalised features spread over the sphere have a std near 1 / sqrt(64); collapsed, 0.
    assert trained["feature_std"] > 0.04, trained
    top1 = next(k for k in trained if k.startswith("knn_top1"))
    assert trained[top1] > random_init[top1] + 0.05, (trained, random_init)
