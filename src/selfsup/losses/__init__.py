"""Public loss functions: pure functions over embeddings, float32 inside under autocast."""

from selfsup.losses.cae import cae_alignment_loss, cae_loss
from selfsup.losses.clustering import deepcluster_loss, swav_loss
from selfsup.losses.colorization import rebalanced_soft_cross_entropy
from selfsup.losses.contrastive import info_nce, moco_v3_loss, nt_xent
from selfsup.losses.distillation import (
    cross_view_cross_entropy,
    dino_center_update,
    dino_loss,
    ibot_patch_loss,
    koleo_loss,
    masked_patch_cross_entropy,
    seed_loss,
    soft_target_distillation_loss,
)
from selfsup.losses.feature_targets import data2vec_loss, data2vec_targets, maskfeat_loss
from selfsup.losses.hard_negatives import MixingDraw, draw_mixing, mix_hard_negatives, mochi_info_nce, mochi_logits
from selfsup.losses.instance import invaspread_loss
from selfsup.losses.masked import masked_l1, masked_mse
from selfsup.losses.metric import (
    bank_softmax_loss,
    contrastive_pair_loss,
    lifted_structured_loss,
    n_pair_loss,
    nce_loss,
    soft_nearest_neighbour_loss,
    triplet_loss,
)
from selfsup.losses.multimodal import CLIP_INIT_LOGIT_SCALE, clip_loss
from selfsup.losses.non_contrastive import barlow_twins_loss, byol_loss, negative_cosine
from selfsup.losses.positional import droppos_loss, patch_similarity_weights, position_smoothing_targets
from selfsup.losses.predictive import cpc_loss
from selfsup.losses.pretext import pretext_classification

__all__ = [
    "CLIP_INIT_LOGIT_SCALE",
    "MixingDraw",
    "bank_softmax_loss",
    "barlow_twins_loss",
    "byol_loss",
    "cae_alignment_loss",
    "cae_loss",
    "clip_loss",
    "contrastive_pair_loss",
    "cpc_loss",
    "cross_view_cross_entropy",
    "data2vec_loss",
    "data2vec_targets",
    "deepcluster_loss",
    "dino_center_update",
    "dino_loss",
    "draw_mixing",
    "droppos_loss",
    "ibot_patch_loss",
    "info_nce",
    "invaspread_loss",
    "koleo_loss",
    "lifted_structured_loss",
    "maskfeat_loss",
    "masked_l1",
    "masked_mse",
    "masked_patch_cross_entropy",
    "mix_hard_negatives",
    "mochi_info_nce",
    "mochi_logits",
    "moco_v3_loss",
    "n_pair_loss",
    "nce_loss",
    "negative_cosine",
    "nt_xent",
    "patch_similarity_weights",
    "position_smoothing_targets",
    "pretext_classification",
    "rebalanced_soft_cross_entropy",
    "seed_loss",
    "soft_nearest_neighbour_loss",
    "soft_target_distillation_loss",
    "swav_loss",
    "triplet_loss",
]
