"""The training loop's hooks, each through the real loop: the epoch-start feature pass, a frozen
model from an earlier run, and optional batch fields (label, text, mask)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from selfsup.config import ConfigError, OptimConfig
from selfsup.engine.build import load_frozen_backbone
from selfsup.engine.evaluation import encode
from selfsup.engine.loop import DataBatch, LoopSchedule, NonFiniteLossError, TrainingLoop
from selfsup.engine.optim import build_optimizer
from selfsup.engine.run import PretrainRun
from selfsup.methods.base import Batch, EpochContext, Method, StepInfo
from selfsup.nn.heads import mlp_head
from selfsup.registry import BACKBONES, METHODS, VIEW_RECIPES
from tests.conftest import tiny_config


@pytest.fixture
def registered() -> Iterator[list[str]]:
    """Names of throw-away methods a test registers; unregistered afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        METHODS.unregister(name)


def _register(names: list[str], name: str, cls: type[Method]) -> None:
    METHODS.register(name)(cls)
    names.append(name)


class _Regress(Method):
    """A minimal method: regress the features of the first view onto zero, through a head."""

    view_recipe = "single_view"

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(int(backbone.num_features), 4)

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        return {"loss": self.head(self.backbone(batch.views[0])).pow(2).mean()}


# ---------------------------------------------------------------------------- epoch start
class _FeaturePass(_Regress):
    """Records, at each epoch start, the mean of a feature pass over the pretraining set."""

    epochs_seen: Tensor
    feature_mean: Tensor

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__(backbone)
        self.register_buffer("epochs_seen", torch.zeros(0))
        self.register_buffer("feature_mean", torch.zeros(int(backbone.num_features)))

    def on_epoch_start(self, ctx: EpochContext) -> None:
        was_training = self.backbone.training
        self.backbone.eval()
        with torch.no_grad():
            features = ctx.encode(self.backbone)
        self.backbone.train(was_training)
        assert features.shape == (ctx.num_samples, self.num_features)
        assert ctx.step.epoch == ctx.epoch  # called before the epoch's first step
        self.epochs_seen = torch.cat([self.epochs_seen, torch.tensor([float(ctx.epoch)])])
        self.feature_mean.copy_(features.mean(dim=0))


def test_epoch_start_hook_gets_a_feature_pass_over_the_pretraining_set(tmp_path: Path, registered: list[str]) -> None:
    _register(registered, "feature_pass", _FeaturePass)
    cfg = tiny_config(tmp_path, "feature_pass", "data.limit=256", "train.epochs=2", "train.batch_size=64")
    run = PretrainRun(cfg)
    seen_means: list[Tensor] = []
    original = run.method.on_epoch_start

    def spy(ctx: EpochContext) -> None:
        original(ctx)
        # The hook's features are the pretraining set's, in order, under the eval view.
        expected, _ = encode(run.method.backbone.eval(), run.parts.splits.pretrain, run.parts.eval_views, run.device)
        run.method.backbone.train()
        torch.testing.assert_close(run.method.feature_mean, expected.mean(dim=0))
        seen_means.append(run.method.feature_mean.clone())

    run.method.on_epoch_start = spy  # type: ignore[method-assign]
    run.fit()
    assert run.method.epochs_seen.tolist() == [0.0, 1.0]
    assert len(seen_means) == 2 and not torch.equal(seen_means[0], seen_means[1]), "training moved nothing"


# ---------------------------------------------------------------------------- frozen models
class _Distil(_Regress):
    """Regress a frozen teacher's features: uses the frozen-model hook."""

    frozen_models = ("teacher",)

    def __init__(self, backbone: nn.Module, teacher: nn.Module | dict[str, str] | str | None = None) -> None:
        super().__init__(backbone)
        assert isinstance(teacher, nn.Module), "the engine passes the loaded teacher"
        self.teacher = teacher
        self.head = mlp_head(int(backbone.num_features), 16, int(teacher.num_features), 2)

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        with torch.no_grad():
            target = self.teacher(batch.views[0])
        return {"loss": (self.head(self.backbone(batch.views[0])) - target).pow(2).mean()}


def test_frozen_model_from_an_earlier_run_is_loaded_frozen_and_used(tmp_path: Path, registered: list[str]) -> None:
    _register(registered, "distil_test", _Distil)
    earlier = PretrainRun(tiny_config(tmp_path, "simclr", "train.max_steps=2", "backbone.width=16", "run.name=teacher"))
    earlier.fit()
    saved = {k: v.clone() for k, v in earlier.method.backbone.state_dict().items()}
    cfg = tiny_config(
        tmp_path,
        "distil_test",
        "train.max_steps=20",
        "run.name=student",
        "optim.name=adamw",
        "optim.lr=3e-3",
        "optim.warmup_epochs=0",
        f"method.teacher={{run: {earlier.run_dir}}}",
    )
    run = PretrainRun(cfg)
    teacher = run.method.teacher
    assert isinstance(teacher, nn.Module) and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert teacher.num_features == earlier.method.backbone.num_features  # width 16, not the config's 8
    run.fit()
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, saved[key]), f"the frozen teacher moved: {key}"
    losses = [
        json.loads(line)["loss"]
        for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses


def test_frozen_model_errors_name_the_path_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no trained backbone at .*finished run"):
        load_frozen_backbone({"run": str(tmp_path / "missing")}, "teacher")
    with pytest.raises(ConfigError, match=r"expected \{run: runs/<name>\}"):
        load_frozen_backbone({"path": "x"}, "teacher")
    from safetensors.torch import save_file

    wide = BACKBONES.build("convnet", in_channels=1, image_size=8, width=16)
    meta = {"backbone": json.dumps({"name": "convnet", "width": 8}), "in_channels": "1", "image_size": "8"}
    save_file(
        {k: v.contiguous() for k, v in wide.state_dict().items()}, str(tmp_path / "backbone.safetensors"), metadata=meta
    )
    with pytest.raises(ConfigError, match="do not fit a .*convnet.* backbone"):
        load_frozen_backbone(str(tmp_path), "teacher")


def test_frozen_vit_saved_with_a_mask_token_loads_strictly(tmp_path: Path) -> None:
    """A SimMIM/BEiT/iBOT ViT saved its mask token: it loads as a teacher or tokenizer, and a
    file whose other keys do not fit is still refused."""
    from safetensors.torch import save_file

    options = {"name": "vit_tiny", "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2}
    vit = BACKBONES.build(
        options["name"], in_channels=1, image_size=8, **{k: v for k, v in options.items() if k != "name"}
    )
    vit.enable_mask_token()
    meta = {"backbone": json.dumps(options), "in_channels": "1", "image_size": "8"}
    state = {k: v.detach().contiguous() for k, v in vit.state_dict().items()}
    assert "mask_token" in state
    save_file(state, str(tmp_path / "backbone.safetensors"), metadata=meta)
    loaded = load_frozen_backbone(str(tmp_path), "teacher")
    assert torch.equal(loaded.mask_token, vit.mask_token)
    state["extra"] = torch.zeros(1)
    save_file(state, str(tmp_path / "backbone.safetensors"), metadata=meta)
    with pytest.raises(ConfigError, match="do not fit"):
        load_frozen_backbone(str(tmp_path), "teacher")


# ---------------------------------------------------------------------------- batch fields
class _Fields(_Regress):
    """Declares labels, captions and masks; checks the loop hands exactly those."""

    batch_fields = frozenset({"label", "text", "mask"})

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        assert batch.label is not None and batch.mask is not None and batch.text is not None
        n = batch.views[0].shape[0]
        assert batch.label.shape == (n,) and batch.mask.shape[0] == n and len(batch.text) == n
        # Each caption names its own sample's label: the fields stay aligned through the split.
        assert all(t == f"a photo of {int(y)}" for t, y in zip(batch.text, batch.label))
        assert torch.equal(batch.mask[:, 0, 0], batch.label)
        return super().training_step(batch, step)


def _loop(method: Method, accum_steps: int = 1) -> TrainingLoop:
    views = VIEW_RECIPES.build(method.view_recipe, image_size=8, in_channels=1, mean=(0.5,), std=(0.25,))
    optimizer = build_optimizer(method.param_groups(), OptimConfig(name="sgd"), lr=0.01)
    return TrainingLoop(
        method,
        optimizer,
        LoopSchedule(total_steps=4, steps_per_epoch=2, peak_lr=0.01),
        views,
        torch.device("cpu"),
        accum_steps=accum_steps,
    )


def _fields_batch(n: int = 8) -> DataBatch:
    label = torch.arange(n) % 3
    return DataBatch(
        images=torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8),
        index=torch.arange(n),
        label=label,
        text=[f"a photo of {int(y)}" for y in label],
        mask=label.view(n, 1, 1).expand(n, 8, 8).clone(),
    )


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_declared_batch_fields_reach_the_step_aligned_under_accumulation(accum_steps: int) -> None:
    method = _Fields(BACKBONES.build("convnet", in_channels=1, image_size=8, width=8))
    loop = _loop(method, accum_steps)
    parts = loop.step(_fields_batch(), loop.step_info(0))
    assert set(parts) == {"loss"}


def test_undeclared_fields_are_withheld_and_missing_ones_are_an_error() -> None:
    plain = _Regress(BACKBONES.build("convnet", in_channels=1, image_size=8, width=8))
    seen: list[Batch] = []
    original = plain.training_step

    def spy(batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        seen.append(batch)
        return original(batch, step)

    plain.training_step = spy  # type: ignore[method-assign]
    loop = _loop(plain)
    loop.step(_fields_batch(), loop.step_info(0))
    assert seen[0].label is None and seen[0].text is None and seen[0].mask is None
    needy = _loop(_Fields(BACKBONES.build("convnet", in_channels=1, image_size=8, width=8)))
    data = _fields_batch()
    data.text = None
    with pytest.raises(ValueError, match="needs the batch field 'text'"):
        needy.step(data, needy.step_info(0))


def test_a_method_needing_labels_is_refused_on_unlabelled_data_before_any_step(
    tmp_path: Path, registered: list[str]
) -> None:
    class _NeedsText(_Regress):
        batch_fields = frozenset({"text"})

    _register(registered, "needs_text", _NeedsText)
    with pytest.raises(ConfigError, match="needs batch field.*text.*does not provide"):
        PretrainRun(tiny_config(tmp_path, "needs_text"))


def test_finetune_method_trains_on_labels_through_the_run(tmp_path: Path) -> None:
    run = PretrainRun(
        tiny_config(
            tmp_path,
            "finetune",
            "train.epochs=4",
            "optim.name=adamw",
            "optim.lr=1e-2",
            "views.crop_scale=[0.8,1.0]",
            "optim.warmup_epochs=0",
        )
    )
    run.fit()
    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["train_top1"] for r in records if "train_top1" in r]
    assert sum(accuracy[-3:]) / 3 > sum(accuracy[:3]) / 3 + 0.25, accuracy


def test_nan_is_raised_before_any_update() -> None:
    method = _Regress(BACKBONES.build("convnet", in_channels=1, image_size=8, width=8))
    before = {k: v.clone() for k, v in method.named_parameters()}
    loop = _loop(method, accum_steps=2)
    calls = {"n": 0}
    original = method.training_step

    def second_microbatch_nan(batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        calls["n"] += 1
        out = original(batch, step)
        return {"loss": out["loss"] * (float("nan") if calls["n"] == 2 else 1.0)}

    method.training_step = second_microbatch_nan  # type: ignore[method-assign]
    with pytest.raises(NonFiniteLossError, match="step 0"):
        loop.step(_fields_batch(), loop.step_info(0))
    after = dict(method.named_parameters())
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not loop.optimizer.state, "the optimiser stepped"
    assert all(p.grad is None for p in method.parameters()), "the first micro-batch's gradient was kept"
