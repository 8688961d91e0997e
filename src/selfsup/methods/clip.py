"""CLIP: contrastive image-text pretraining; an image and its caption must find each other.

References: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision" (CLIP), arXiv:2103.00020 (Figure 3's pseudocode, sec. 2.3-2.5).

Pseudocode (Figure 3 of the paper)::

    I_f = image_encoder(I)                      # (n, d_i)  the configured backbone
    T_f = text_encoder(T)                       # (n, d_t)  causal transformer, [EOS] pooled
    I_e = l2_normalize(I_f @ W_i)               # (n, d_e)  linear projections
    T_e = l2_normalize(T_f @ W_t)
    logits = I_e @ T_e.T * exp(t)               # learnable temperature, exp(t) clipped at 100
    loss = (CE(logits, arange(n), axis=0) + CE(logits, arange(n), axis=1)) / 2

The captions are tokenised by a byte-level BPE vocabulary trained on the training captions
when the method is built; the vocabulary is kept in the state dict (``tokenizer_json``), so a
checkpoint re-tokenises exactly, and the run folder gets it as ``tokenizer.json``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from selfsup.losses import clip_loss
from selfsup.methods.base import Batch, Method, StepInfo
from selfsup.nn.backbones.protocol import feature_dim
from selfsup.nn.text import BPETokenizer, TextTransformer
from selfsup.registry import METHODS

logger = logging.getLogger(__name__)


def _as_bytes(text: str) -> Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


@METHODS.register("clip")
class CLIP(Method):
    """CLIP with the configured backbone as image encoder and a small causal text transformer.

    Args:
        backbone: image encoder ``(B, C, H, W) -> (B, num_features)``.
        captions: the training captions (engine fact), on which the BPE vocabulary is trained.
        proj_dim: size of the joint embedding space (paper: 512 for ViT-B/32, 1024 for RN50).
        context_length: tokens per caption incl. ``<sot>``/``<eot>`` (paper: 77).
        vocab_size: BPE vocabulary size incl. 256 bytes and 3 special tokens (paper: 49,408).
        text_width: width of the text transformer (paper: 512).
        text_depth: its number of blocks (paper: 12).
        text_heads: its attention heads (paper: 8).
        init_temperature: initial softmax temperature (paper: 0.07).
        max_logit_scale: clip of ``exp(logit_scale)`` (paper: 100).
        gather: contrast against the pairs of every process (with gradients).
    """

    view_recipe = "single_view"
    batch_fields = frozenset({"text"})
    engine_facts = ("captions",)
    tokenizer_json: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        captions: Sequence[str],
        proj_dim: int = 512,
        context_length: int = 77,
        vocab_size: int = 49408,
        text_width: int = 512,
        text_depth: int = 12,
        text_heads: int = 8,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        gather: bool = True,
    ) -> None:
        super().__init__()
        if not captions:
            raise ValueError("clip needs training captions; the data set has none")
        if not (init_temperature > 0 and 1.0 / init_temperature <= max_logit_scale):
            raise ValueError(
                f"init_temperature={init_temperature} must be > 0 with 1/init_temperature <= max_logit_scale"
            )
        self.backbone = backbone
        self.tokenizer = BPETokenizer.train(captions, vocab_size, context_length)
        self.register_buffer("tokenizer_json", _as_bytes(self.tokenizer.to_json()))
        self._warn_truncated(captions)
        self.image_projection = nn.Linear(feature_dim(backbone), proj_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=feature_dim(backbone) ** -0.5)
        self.text = TextTransformer(
            vocab_size, context_length, text_width, text_depth, text_heads, proj_dim, self.tokenizer.eot_id
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_logit_scale = max_logit_scale
        self.gather = gather

    def _warn_truncated(self, captions: Sequence[str]) -> None:
        """One counted warning for the captions longer than the context (they are truncated)."""
        counts = self.tokenizer.token_counts(captions)
        room = self.tokenizer.context_length - 2
        long = sum(c > room for c in counts)
        if long:
            logger.warning(
                "clip: %d of %d training captions have more than %d tokens (longest: %d) and are truncated; "
                "raise method.context_length to keep them whole",
                long,
                len(counts),
                room,
                max(counts),
            )

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        # A checkpoint's vocabulary replaces the one trained at build time (same captions give
        # the same vocabulary; another data option or tokenizers version may not).
        saved = state_dict.get(prefix + "tokenizer_json")
        if isinstance(saved, Tensor) and not torch.equal(saved.cpu(), self.tokenizer_json.cpu()):
            self.tokenizer = BPETokenizer.from_json(bytes(saved.cpu().tolist()).decode("utf-8"))
            self.tokenizer_json = saved.clone().to(self.tokenizer_json.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def tokenize(self, texts: Sequence[str], device: torch.device) -> Tensor:
        """``B`` captions -> ``(B, context_length)`` token ids on ``device``."""
        return self.tokenizer.encode(texts).to(device)

    def image_features(self, images: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, proj_dim)`` unnormalised image embeddings."""
        out: Tensor = self.image_projection(self.backbone(images))
        return out

    def text_features(self, texts: Sequence[str], device: torch.device) -> Tensor:
        """``B`` captions -> ``(B, proj_dim)`` unnormalised text embeddings."""
        out: Tensor = self.text(self.tokenize(texts, device))
        return out

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, proj_dim)`` L2-normalised joint-space embeddings (zero-shot)."""
        return nn.functional.normalize(self.image_features(images).float(), dim=1)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], device: torch.device) -> Tensor:
        """``B`` captions -> ``(B, proj_dim)`` L2-normalised joint-space embeddings."""
        return nn.functional.normalize(self.text_features(texts, device).float(), dim=1)

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        x = batch.views[0]
        img = self.image_features(x)
        txt = self.text_features(batch.text, x.device)
        loss = clip_loss(img, txt, self.logit_scale, gather=self.gather, max_scale=self.max_logit_scale)
        with torch.no_grad():  # in-batch image->text accuracy: the pretext task's score
            sims = nn.functional.normalize(img.float(), dim=1) @ nn.functional.normalize(txt.float(), dim=1).T
            acc = (sims.argmax(1) == torch.arange(len(sims), device=sims.device)).float().mean()
        scale = self.logit_scale.detach().exp().clamp(max=self.max_logit_scale)
        return {"loss": loss, "logit_scale": scale, "i2t_batch_acc": acc}

    def on_step_end(self, step: StepInfo, outputs: Any) -> None:
        # The paper clips the learnable temperature so logits are scaled by at most 100: the
        # parameter itself stays in [0, log 100], not only its use in the loss.
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, math.log(self.max_logit_scale))
