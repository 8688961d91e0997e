"""SEED: a small student mimics a frozen self-supervised teacher's similarity distribution over a
queue of past teacher embeddings.

References: Fang, Wang, Wang, Zhang, Yang & Liu, "SEED: Self-supervised Distillation For Visual
Representation", ICLR 2021 (arXiv:2101.04731); the authors' code, github.com/jacobswan1/SEED
(``seed/builder.py``, ``main.py``, ``tools/opts.py``).

Pseudocode (one augmented view ``x``, seen by both networks)::

    z_T = normalize(f_T(x)).detach()           # frozen teacher from an earlier SSL run: N x D
    z_S = normalize(h(f_S(x)))                  # student + MLP head to the teacher's width D
    D+ = [z_T_i; queue]                         # each sample's own teacher embedding first
    p_T = softmax(z_T . D+ / tau_T)             # N x (1 + K), the soft targets
    p_S = softmax(z_S . D+ / tau_S)
    loss = mean_i -sum_j p_T[i, j] log p_S[i, j]
    enqueue(z_T); dequeue oldest                # engine: on_step_end(), after the optimiser step
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from selfsup.losses import seed_loss
from selfsup.methods.base import Batch, Method, StepInfo, StepOutputs
from selfsup.methods.moco_v2 import default_queue_size
from selfsup.monitors import feature_std_tensor
from selfsup.nn.backbones.protocol import feature_dim
from selfsup.nn.heads import mlp_head
from selfsup.nn.memory import FIFOQueue
from selfsup.registry import METHODS


@METHODS.register("seed")
class SEED(Method):
    """SEED with the authors' code defaults: tau_S 0.2, tau_T 1e-4, MLP head, one view.

    Defaults, from the authors' code (``tools/opts.py``, ``seed/builder.py``, ``main.py``):
    ``--temp 0.2`` (student; the builder's own ``t=0.07`` is overridden by it, and the README's
    command passes ``--temp 0.2``), ``--distill-t 1e-4`` (teacher), ``--queue 65536``,
    ``--student_mlp True`` (the student's ``fc`` becomes ``Linear(d, d) -> ReLU -> Linear(d,
    dim)``, no BatchNorm, ``d`` the student's feature width), and one augmented image per sample
    fed to both networks (``model(image=images)``), hence the ``single_view`` recipe; configs
    switch on the colour jitter of the SimCLR / MoCo v2 augmentation the code uses. The queue
    starts as random unit vectors, all used as negatives from the first step (the code's MoCo
    queue). Where this differs from the code: its teacher includes the teacher's SSL projection
    head (``dim = 128``), while an earlier run here exports only its backbone
    (``backbone.safetensors``), so ``z_T`` is the teacher's pooled backbone feature and the head
    maps to its width; and the queue is capped by ``default_queue_size`` (MoCo v2's rule) on
    small data sets. The loss is the paper's (its ``D+`` is the queue plus the sample's own
    teacher embedding, as in the code); the numbers above are the code's and have not been
    checked against the paper's implementation-details text.

    Args:
        backbone: the student encoder ``(B, C, H, W) -> (B, num_features)``; it is what
            evaluation and export use.
        num_samples: size of the pretraining set (set by the engine; sizes the queue).
        teacher: the frozen teacher backbone. In a config ``method.teacher={run: runs/<name>}``
            (a finished run's folder); the engine loads it and passes the module.
        proj_hidden_dim: hidden width of the student's head; ``None`` = the student's feature
            width (the code's ``Linear(d, d)``).
        student_temperature: ``tau_S`` (code: 0.2).
        teacher_temperature: ``tau_T`` (code: 1e-4).
        queue_size: number of past teacher embeddings; ``None`` = ``default_queue_size(
            num_samples)`` (65536, the code's ``--queue``, capped at a quarter of the data).
    """

    view_recipe = "single_view"
    engine_facts = ("num_samples",)
    frozen_models = ("teacher",)
    lr_scaling = "linear"

    def __init__(
        self,
        backbone: nn.Module,
        num_samples: int = 65536 * 4,
        teacher: nn.Module | dict[str, str] | str | None = None,
        proj_hidden_dim: int | None = None,
        student_temperature: float = 0.2,
        teacher_temperature: float = 1e-4,
        queue_size: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(teacher, nn.Module):
            raise ValueError(
                f"SEED distils a frozen teacher from an earlier run, but method.teacher is {teacher!r}; "
                "set method.teacher={run: runs/<name>} (the folder of a finished run, which holds "
                "backbone.safetensors), e.g. method.teacher={run: runs/demo-simclr-fashion-mnist}"
            )
        self.backbone = backbone
        # Frozen whatever the caller passed: no gradient, and eval mode (Method.train keeps it so).
        self.teacher = teacher.requires_grad_(False).eval()
        teacher_dim = feature_dim(teacher)
        width = feature_dim(backbone)
        self.projector = mlp_head(width, proj_hidden_dim or width, teacher_dim, 2, hidden_norm="none")
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.queue = FIFOQueue(queue_size or default_queue_size(num_samples), teacher_dim)

    @torch.no_grad()
    def _teacher_embedding(self, x: Tensor) -> Tensor:
        return F.normalize(self.teacher(x).float(), dim=1)

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        x = batch.views[0]
        z_t = self._teacher_embedding(x)
        z_s = F.normalize(self.projector(self.backbone(x)), dim=1)
        loss = seed_loss(
            z_s, z_t, self.queue.values(only_filled=False), self.student_temperature, self.teacher_temperature
        )
        return {
            "loss": loss,
            "teacher_cosine": (z_s.detach().float() * z_t).sum(dim=1).mean(),
            "z_std": feature_std_tensor(z_s),
            "teacher_keys": z_t,
        }

    def on_step_end(self, step: StepInfo, outputs: StepOutputs) -> None:
        # The queue changes only here, after the optimiser step, never inside the forward.
        self.queue.enqueue(outputs["teacher_keys"])
