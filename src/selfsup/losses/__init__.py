"""Public loss functions: pure functions over embeddings, float32 inside under autocast."""

from selfsup.losses.clustering import swav_loss
from selfsup.losses.colorization import rebalanced_soft_cross_entropy
from selfsup.losses.contrastive import info_nce, moco_v3_loss, nt_xent
from selfsup.losses.distillation import dino_center_update, dino_loss, koleo_loss, seed_loss
from selfsup.losses.hard_negatives import MixingDraw, draw_mixing, mix_hard_negatives, mochi_info_nce, mochi_logits
from selfsup.losses.instance import invaspread_loss
from selfsup.losses.masked import masked_l1, masked_mse
from selfsup.losses.metric import (
    contrastive_pair_loss,
    lifted_structured_loss,
    n_pair_loss,
    nce_loss,
    soft_nearest_neighbour_loss,
    triplet_loss,
)
from selfsup.losses.multimodal import CLIP_INIT_LOGIT_SCALE, clip_loss
from selfsup.losses.non_contrastive import barlow_twins_loss, byol_loss, negative_cosine
from selfsup.losses.pretext import pretext_classification

__all__ = [
    "CLIP_INIT_LOGIT_SCALE",
    "MixingDraw",
    "barlow_twins_loss",
    "byol_loss",
    "clip_loss",
    "contrastive_pair_loss",
    "dino_center_update",
    "dino_loss",
    "draw_mixing",
    "info_nce",
    "invaspread_loss",
    "koleo_loss",
    "lifted_structured_loss",
    "masked_l1",
    "masked_mse",
    "mix_hard_negatives",
    "mochi_info_nce",
    "mochi_logits",
    "moco_v3_loss",
    "n_pair_loss",
    "nce_loss",
    "negative_cosine",
    "nt_xent",
    "pretext_classification",
    "rebalanced_soft_cross_entropy",
    "seed_loss",
    "soft_nearest_neighbour_loss",
    "swav_loss",
    "triplet_loss",
]
