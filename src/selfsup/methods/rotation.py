"""RotNet: predict by how much each image was rotated (0, 90, 180 or 270 degrees).

References: Gidaris, Singh & Komodakis, "Unsupervised Representation Learning by Predicting
Image Rotations", ICLR 2018 (arXiv:1803.07728).

Pseudocode (Section 2 of the paper)::

    for x in batch:                                  # one augmented view per image
        xs, y = [rot(x, 0), rot(x, 90), rot(x, 180), rot(x, 270)], [0, 1, 2, 3]
        logits = head(f(xs))                         # all four copies in the same batch
        loss = mean cross-entropy(logits, y)         # 4-way classification

The paper found it "significantly better" to feed all four rotated copies of each image in the
same mini-batch than one random rotation per image (Section 3.1), and that rotations by
multiples of 90 degrees are the right choice: exact (``torch.rot90``, no interpolation
artefacts that would give the angle away) and, for upright photos, unambiguous.
"""

from __future__ import annotations

from torch import Tensor, nn

from selfsup.losses import pretext_classification
from selfsup.methods.base import Batch, Method, StepInfo
from selfsup.monitors import feature_std_tensor
from selfsup.nn.backbones.protocol import feature_dim
from selfsup.nn.heads import mlp_head
from selfsup.registry import METHODS
from selfsup.transforms.pretext import rotate_batch

NUM_ROTATIONS = 4


@METHODS.register("rotation")
class Rotation(Method):
    """RotNet: a 4-way rotation classifier on the backbone's pooled features.

    The evaluated encoder is ``backbone`` (the paper evaluates the conv features); the head is
    thrown away after pretraining.

    Args:
        backbone: encoder ``(B, C, H, W) -> (B, num_features)``; images must be square.
        hidden_dim: width of the head's hidden layer; ``0`` = a linear head on the features.
            The paper's NIN variant ends in a conv block, global pooling and a linear layer,
            which the backbone's last stage and a linear head mirror (default ``0``).

    Shapes:
        ``batch.views[0]`` ``(B, C, S, S)`` -> 4B rotated images -> logits ``(4B, 4)``.
    """

    view_recipe = "single_view"

    def __init__(self, backbone: nn.Module, hidden_dim: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        dim = feature_dim(backbone)
        self.rotation_head: nn.Module = (
            nn.Linear(dim, NUM_ROTATIONS) if hidden_dim == 0 else mlp_head(dim, hidden_dim, NUM_ROTATIONS, 2)
        )

    def logits_and_labels(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits (4B, 4), labels (4B,), features (4B, D))`` for images ``(B, C, S, S)``."""
        rotated, labels = rotate_batch(images)
        # One pass over the 4B images: BatchNorm statistics mix all four rotations, so they
        # cannot tell the angle apart by batch statistics alone.
        h = self.backbone(rotated)
        return self.rotation_head(h), labels, h

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        logits, labels, h = self.logits_and_labels(batch.views[0])
        loss, accuracy = pretext_classification(logits, labels)
        return {"loss": loss, "pretext_acc": accuracy, "h_std": feature_std_tensor(h)}
