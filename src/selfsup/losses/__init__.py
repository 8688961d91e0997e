"""Public loss functions: pure functions over embeddings, float32 inside under autocast."""

from selfsup.losses.clustering import swav_loss
from selfsup.losses.contrastive import info_nce, moco_v3_loss, nt_xent
from selfsup.losses.distillation import dino_center_update, dino_loss, koleo_loss, seed_loss
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

__all__ = [
    "CLIP_INIT_LOGIT_SCALE",
    "barlow_twins_loss",
    "byol_loss",
    "clip_loss",
    "contrastive_pair_loss",
    "dino_center_update",
    "dino_loss",
    "info_nce",
    "koleo_loss",
    "lifted_structured_loss",
    "masked_l1",
    "masked_mse",
    "moco_v3_loss",
    "n_pair_loss",
    "nce_loss",
    "negative_cosine",
    "nt_xent",
    "seed_loss",
    "soft_nearest_neighbour_loss",
    "swav_loss",
    "triplet_loss",
]
