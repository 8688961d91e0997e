"""Contract tests for every registered method (DESIGN.md test policy 2), driven by the registry."""

from __future__ import annotations

import copy
import inspect
import pkgutil
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import selfsup.methods
from selfsup.config import OptimConfig
from selfsup.engine.checkpoint import rng_state, set_rng_state
from selfsup.engine.loop import DataBatch, LoopSchedule, TrainingLoop
from selfsup.engine.optim import build_optimizer
from selfsup.methods.base import ENGINE_FACTS, Batch, Method, StepInfo
from selfsup.registry import BACKBONES, METHODS, VIEW_RECIPES

METHOD_NAMES = METHODS.names()
SMALL = {
    "proj_hidden_dim": 32,
    "proj_dim": 16,
    "pred_hidden_dim": 32,
    "out_dim": 32,
    "patch_out_dim": 32,
    "num_prototypes": 16,
    "decoder_embed_dim": 32,
    "decoder_depth": 1,
    "decoder_num_heads": 2,
    "fc6_dim": 16,
    "fc7_dim": 32,
    "num_permutations": 8,
    "text_width": 32,
    "text_depth": 1,
    "text_heads": 2,
    "context_length": 16,
    "vocab_size": 300,
    "freeze_last_layer_epochs": 0.0,  # DINO's frozen first epoch gives its last layer no gradient
    "freeze_prototypes_steps": 0,  # and SwAV's frozen prototypes none either
}
NUM_SAMPLES = 256  # the pretraining set of the contract runs (engine fact and epoch pass)
FACTS = {
    "num_samples": NUM_SAMPLES,
    "image_size": 16,
    "in_channels": 1,
    "batch_size": 8,
    "num_classes": 3,
    "num_global_crops": 2,
    "mean": (0.5,),
    "std": (0.25,),
    "captions": [f"caption {i} of {NUM_SAMPLES}" for i in range(NUM_SAMPLES)],
}
# Methods that need colour input (colorization predicts ab from L) get 3-channel images.
CHANNELS = {"colorization": 3}


def channels(method: Method) -> int:
    return max((CHANNELS.get(n, 1) for n in METHOD_NAMES if METHODS.get(n) is type(method)), default=1)


def _frozen_convnet(in_channels: int, image_size: int) -> torch.nn.Module:
    """A loaded model as the engine passes it for a ``frozen_models`` option: frozen, in eval
    mode, wider than the student (width 8) so that a head must bridge the two widths."""
    model = BACKBONES.build("convnet", in_channels=in_channels, image_size=image_size, width=16)
    return model.requires_grad_(False).eval()  # type: ignore[no-any-return]


# Fixed-batch overfit steps where 40 are too few: relative location sees one random neighbour
# per image per step, so each (image, neighbour) pair recurs only every ~8 steps. DropPos must
# memorise where each patch of 16 random smooth images sits, from 3 dropped patches per image
# per step (its learning on real images is tested in test_droppos.py).
OVERFIT_STEPS = {"relative_location": 200, "droppos": 300}


def _frozen_tokenizer(in_channels: int, image_size: int) -> torch.nn.Module:
    """BEiT's ``tokenizer`` as the engine loads a vq_tokenizer run (untrained, frozen): 4 px
    patches, like the contract ViT."""
    spec = {"in_channels": in_channels, "image_size": image_size, "patch_size": 4, "hidden_dim": 8, "codebook_size": 32}
    tokenizer = METHODS.get("vq_tokenizer").build_embedder(spec, lambda: None)  # type: ignore[attr-defined]
    return tokenizer.requires_grad_(False).eval()  # type: ignore[no-any-return]


# Frozen models by option name, for the methods that need one (SEED's teacher, BEiT's
# tokenizer); optional ones such as finetune's ``init`` (which must match the backbone) keep
# their default.
FROZEN = {"teacher": _frozen_convnet, "tokenizer": _frozen_tokenizer}


def build(name: str, in_channels: int | None = None, image_size: int = 16) -> Method:
    cls = METHODS.get(name)
    in_channels = CHANNELS.get(name, 1) if in_channels is None else in_channels
    if cls.requires_token_backbone:  # masked image modelling drops or replaces patch tokens
        backbone = BACKBONES.build(
            "vit_tiny", in_channels=in_channels, image_size=image_size, patch_size=4, embed_dim=32, depth=1, num_heads=2
        )
    else:
        backbone = BACKBONES.build("convnet", in_channels=in_channels, image_size=image_size, width=8)
    params = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in SMALL.items() if k in params}
    kwargs.update({k: FACTS[k] if k != "in_channels" else in_channels for k in cls.engine_facts})
    kwargs.update({k: FROZEN[k](in_channels, image_size) for k in cls.frozen_models if k in FROZEN})
    return cls(backbone=backbone, **kwargs)  # type: ignore[no-any-return]


def smooth_images(
    batch_size: int, image_size: int = 16, generator: torch.Generator | None = None, channels: int = 1
) -> Tensor:
    """Smooth random images in [0, 1] (4x4 noise upsampled): like natural images, neighbouring
    pixels correlate, which masked-prediction methods rely on; white noise has nothing to predict."""
    coarse = torch.rand(batch_size, channels, 4, 4, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=image_size, mode="bilinear", align_corners=False)


def views_of(method: Method, image_size: int = 16) -> torch.nn.Module:
    return VIEW_RECIPES.build(
        method.view_recipe, image_size=image_size, in_channels=channels(method), mean=(0.5,), std=(0.25,)
    )


def make_batch(method: Method, batch_size: int = 8, image_size: int = 16) -> Batch:
    images = smooth_images(batch_size, image_size, channels=channels(method))
    return Batch(
        views=views_of(method, image_size)(images),
        index=torch.arange(batch_size),
        label=torch.arange(batch_size) % 3,
        images=images,
        text=[f"caption {i} of {NUM_SAMPLES}" for i in range(batch_size)],  # image-text methods (CLIP)
    )


def info(method: Method, step: int = 0, total: int = 10) -> StepInfo:
    plain = StepInfo(step=step, total_steps=total, epoch=0.0, lr=0.1, ema_momentum=0.9)
    return plain.with_schedules(method.schedules())


def test_every_method_module_registers_a_method() -> None:
    """A method file that registers nothing would escape every contract test below."""
    helpers = {"base", "online_target"}  # shared code, not methods
    modules = {m.name for m in pkgutil.iter_modules(selfsup.methods.__path__)} - helpers
    registered_in = {METHODS.get(name).__module__.rsplit(".", 1)[-1] for name in METHOD_NAMES}
    assert modules <= registered_in, modules - registered_in


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_declarations_are_consistent(name: str) -> None:
    cls = METHODS.get(name)
    params = inspect.signature(cls).parameters
    assert set(cls.engine_facts) <= set(ENGINE_FACTS)
    assert all(fact in params for fact in cls.engine_facts), "declared facts must be constructor parameters"
    assert all(option in params for option in cls.frozen_models)
    assert set(cls.batch_fields) <= {"label", "text", "mask"}
    method = build(name)
    assert method.uses_ema == bool(method.ema_pairs())


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_loss_is_finite_scalar_and_gradients_reach_trainables_only(name: str) -> None:
    method = build(name)
    out = method.training_step(make_batch(method), info(method))
    loss = out["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for pname, p in method.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{pname} got no gradient"
        else:
            assert p.grad is None, f"frozen {pname} got a gradient"
    for _, teacher in method.ema_pairs():
        assert all(not p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("name", [n for n in METHOD_NAMES if build(n).uses_ema])
def test_ema_moves_teacher_toward_student(name: str) -> None:
    from selfsup.nn.ema import update_ema

    method = build(name)
    student, teacher = method.ema_pairs()[0]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [(s - t).norm() for s, t in zip(student.parameters(), teacher.parameters())]
    update_ema(student, teacher, 0.9)
    after = [(s - t).norm() for s, t in zip(student.parameters(), teacher.parameters())]
    assert all(a < b for a, b in zip(after, before))


@pytest.mark.parametrize("name", [n for n in METHOD_NAMES if build(n).uses_ema])
def test_ema_teacher_has_no_stochastic_depth(name: str) -> None:
    """A teacher copies the student's ViT, drop path included; its targets must come from the
    whole network (the engine keeps teachers in training mode, so eval mode does not help)."""
    from selfsup.nn.backbones.vit import DropPath

    cls = METHODS.get(name)
    backbone = BACKBONES.build(
        "vit_tiny",
        in_channels=CHANNELS.get(name, 1),
        image_size=16,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        drop_path_rate=0.5,
    )
    params = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in SMALL.items() if k in params}
    kwargs.update({k: FACTS[k] if k != "in_channels" else CHANNELS.get(name, 1) for k in cls.engine_facts})
    kwargs.update({k: FROZEN[k](CHANNELS.get(name, 1), 16) for k in cls.frozen_models if k in FROZEN})
    method = cls(backbone=backbone, **kwargs)
    assert any(m.p > 0 for m in method.backbone.modules() if isinstance(m, DropPath)), "the student keeps it"
    method.train()  # as the engine does: teachers stay in the method's mode unless it says otherwise
    for _, teacher in method.ema_pairs():
        assert not any(m.training and m.p > 0 for m in teacher.modules() if isinstance(m, DropPath)), name


def _stashed_tensors(method: Method) -> list[str]:
    """Tensors (or lists of them) held in plain attributes: state outside the state dict."""
    found = []
    for module_name, module in method.named_modules():
        for key, value in vars(module).items():
            if key in ("_parameters", "_buffers", "_modules"):
                continue
            items = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, Tensor) for v in items):
                found.append(f"{module_name}.{key}" if module_name else key)
    return found


def _loop(name: str, seed: int) -> TrainingLoop:
    """A real training loop around a freshly built method (init drawn from ``seed``)."""
    torch.manual_seed(seed)
    method = build(name)
    optimizer = build_optimizer(method.param_groups(), OptimConfig(name="adamw", weight_decay=0.05), lr=1e-3)
    # Two steps per epoch, so the run crosses epoch boundaries (on_epoch_start, DINO's frozen
    # last layer and teacher-temperature warm-up, SwAV's queue start all depend on them).
    schedule = LoopSchedule(
        total_steps=8,
        steps_per_epoch=2,
        peak_lr=1e-3,
        warmup_steps=2,
        weight_decay=(0.05, 0.1),
        ema_momentum=(0.9, 0.99),
    )
    return TrainingLoop(
        method,
        optimizer,
        schedule,
        views_of(method),
        torch.device("cpu"),
        encode_pretrain=_encode_pretrain,
        num_samples=NUM_SAMPLES,
    )


def _encode_pretrain(fn: Callable[[Tensor], Tensor]) -> Tensor:
    """The epoch hook's feature pass (DeepCluster's k-means) over a fixed pretraining set of
    ``NUM_SAMPLES`` images, as the engine's: normalised, in batches, without grad."""
    images = smooth_images(NUM_SAMPLES, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return torch.cat([fn((x - 0.5) / 0.25) for x in images.split(64)])


def _data(step: int, num_channels: int = 1) -> DataBatch:
    g = torch.Generator().manual_seed(100 + step)
    images = (smooth_images(8, generator=g, channels=num_channels) * 255).to(torch.uint8)
    index = torch.arange(8) + 8 * step
    text = [f"caption {i} of {NUM_SAMPLES}" for i in index.tolist()]  # image-text methods (CLIP)
    return DataBatch(images=images, index=index, label=torch.arange(8) % 3, text=text)


def _steps(loop: TrainingLoop, steps: range) -> list[float]:
    losses = []
    for step in steps:
        info = loop.step_info(step)
        if step % loop.schedule.steps_per_epoch == 0:
            loop.epoch_start(step // loop.schedule.steps_per_epoch, info)
        losses.append(loop.step(_data(step, channels(loop.method)), info)["loss"])
    return losses


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_saved_state_continues_with_the_uninterrupted_runs_next_losses(name: str) -> None:
    """Save after k steps of the real loop, load into a freshly built object (other init), and
    the next losses equal the uninterrupted run's bit for bit: every piece of state that
    outlives a step (teachers, queues, centres, optimiser moments) is in the state dicts."""
    a = _loop(name, seed=0)
    _steps(a, range(3))
    assert not _stashed_tensors(a.method), f"state outside the state dict: {_stashed_tensors(a.method)}"
    saved = copy.deepcopy({"method": a.method.state_dict(), "optimizer": a.optimizer.state_dict(), "rng": rng_state()})
    expected = _steps(a, range(3, 6))

    b = _loop(name, seed=1)  # other initial weights, queues, prototypes
    b.method.load_state_dict(saved["method"])
    b.optimizer.load_state_dict(saved["optimizer"])
    set_rng_state(saved["rng"])
    assert _steps(b, range(3, 6)) == expected
    for key, value in b.method.state_dict().items():
        assert torch.equal(value, a.method.state_dict()[key]), key


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_embed_shape_and_eval_mode(name: str) -> None:
    """``embed`` in eval mode: ``(B, num_features)``, each sample's features independent of the
    rest of the batch (BatchNorm on running statistics), and no buffer changes."""
    method = build(name)
    with torch.no_grad():  # make the running statistics differ from any batch's own
        for module in method.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    method.eval()
    buffers = copy.deepcopy(dict(method.named_buffers()))
    images = torch.rand(5, channels(method), 16, 16)
    feats = method.embed(images)
    assert feats.shape == (5, method.num_features)
    torch.testing.assert_close(method.embed(images[:2]), feats[:2], rtol=1e-4, atol=1e-5)
    for key, value in method.named_buffers():
        assert torch.equal(value, buffers[key]), f"embed changed {key}"
    # What backbone.safetensors, exports and load_encoder hold computes exactly embed.
    embedder, _ = method.embedder()
    with torch.no_grad():
        torch.testing.assert_close(embedder(images), feats)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_fixed_batch_overfit_loss_falls(name: str) -> None:
    """A fixed batch of fixed views: 40 Adam steps must lower the loss clearly.

    ``on_step_end`` is not called: on a fixed batch it would fill MoCo's queue with the batch's
    own keys (each positive again as a negative), so the negatives stay fixed as well."""
    from selfsup.nn.ema import update_ema

    torch.manual_seed(0)
    method = build(name)
    batch = make_batch(method, batch_size=16)
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    steps = OVERFIT_STEPS.get(name, 40)
    for step in range(steps):
        out = method.training_step(batch, info(method, step, steps))
        losses.append(float(out["loss"].detach()))
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for student, teacher in method.ema_pairs():
                update_ema(student, teacher, 0.9)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_param_groups_exclude_norms_and_biases_from_decay() -> None:
    method = build("simclr")
    groups = {g["name"]: g for g in method.param_groups()}
    assert all(p.ndim > 1 for p in groups["decay"]["params"])
    assert groups["no_decay"]["weight_decay"] == 0.0
    n_params = sum(1 for p in method.parameters() if p.requires_grad)
    assert len(groups["decay"]["params"]) + len(groups["no_decay"]["params"]) == n_params


def test_moco_queue_updates_only_in_on_step_end() -> None:
    method = build("moco_v2")
    batch = make_batch(method)
    before = method.queue.queue.clone()
    out = method.training_step(batch, info(method))
    assert torch.equal(method.queue.queue, before), "forward must not touch the queue"
    method.on_step_end(info(method), out)
    assert torch.equal(method.queue.queue[:8], out["keys"])
