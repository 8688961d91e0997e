"""BEiT v2 stage 1, VQ-KD: a ViT tokenizer whose codes are trained to reconstruct a teacher's
patch features (vector-quantised knowledge distillation).

References: Peng, Dong, Bao, Ye & Wei, "BEiT v2: Masked Image Modeling with Vector-Quantized
Visual Tokenizers", arXiv:2208.06366, Section 2.2.

Pseudocode::

    h = vit(x)[:, 1:]                          # (B, L, D) patch tokens of the encoder
    z = l2(encode_head(h))                     # (B, L, d) Linear-Tanh-Linear, d = 32
    e, ids = argmax_k cos(z, l2(codebook_k))   # l2-normalised lookup, codebook 8192 x 32
    o = decoder(z + sg[e - z])                 # 3 transformer blocks, Linear-Tanh-Linear
    t = teacher_patch_features(x)              # (B, L, D_t), frozen
    loss = mean(1 - cos(o, t)) + beta * ||z - sg[e]||^2       # beta = 1
    on_step_end: EMA of the codebook from (z, ids), l2-normalised; dead codes restarted

The teacher is any earlier run of this library (``method.teacher: runs/<dino or moco_v3
run>``), loaded frozen by the engine: a ViT gives its patch tokens, a ConvNet its last feature
map; when that grid differs from the tokenizer's patch grid the feature map is resized to it
(bilinear, antialiased), so every token has one target. The paper's teacher is CLIP or DINO
ViT-B/16 on the same 14x14 grid.

The tokenizer run's ``backbone.safetensors`` holds the ViT, the encode head and the codebook
(:class:`VQKDTokenizer`), which a ``beit`` run loads as its ``tokenizer``; ``embed`` is the
ViT's pooled features.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.methods.base import Batch, Method, StepInfo, StepOutputs, check_token_backbone
from selfsup.methods.vq_tokenizer import Tokenizer, evaluate_tokenizer
from selfsup.nn.backbones.protocol import as_token_backbone, feature_dim, feature_map, feature_map_dim
from selfsup.nn.backbones.vit import Block, sincos_pos_embed_2d
from selfsup.nn.quantizer import Quantized, VectorQuantizer
from selfsup.registry import METHODS


def task_layer(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """BEiT v2's encode / decode task layer: ``Linear -> Tanh -> Linear``."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, out_dim))


class VQKDTokenizer(Tokenizer):
    """The inference part of VQ-KD: ViT -> encode head -> l2-normalised codebook lookup.

    Args:
        encoder: a ViT with the token API.
        encode_head: `(B, L, D) -> (B, L, d)` map to the code space.
        quantizer: the cosine :class:`VectorQuantizer` (its codebook).

    ``forward(x)``: the ViT's pooled features `(B, D)`; ``encode(x)``: `(B, L, d)`;
    ``tokenize(x)``: `(B, L)` code ids.
    """

    def __init__(self, encoder: nn.Module, encode_head: nn.Module, quantizer: VectorQuantizer) -> None:
        super().__init__()
        check_token_backbone(encoder, "VQ-KD")
        vit = as_token_backbone(encoder)
        self.encoder = encoder
        self.encode_head = encode_head
        self.quantizer = quantizer
        self.patch_size = int(vit.patch_size)
        self.grid_size = (int(vit.grid_size[0]), int(vit.grid_size[1]))
        self.num_features = feature_dim(encoder)

    def encode(self, x: Tensor) -> Tensor:
        tokens = as_token_backbone(self.encoder).forward_tokens(x)[:, 1:]
        return self.encode_head(tokens)

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)


class VQKDDecoder(nn.Module):
    """Quantised codes `(B, L, d)` to teacher features `(B, L, D_t)`: a linear embedding,
    fixed 2-D sin-cos positions, pre-norm transformer blocks, LayerNorm, Linear-Tanh-Linear."""

    pos_embed: Tensor

    def __init__(
        self, code_dim: int, grid_size: tuple[int, int], width: int, depth: int, num_heads: int, out_dim: int
    ) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"decoder_num_heads {num_heads} must divide decoder_embed_dim {width}")
        self.embed = nn.Linear(code_dim, width)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(width, *grid_size).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(Block(width, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = task_layer(width, width, out_dim)

    def forward(self, codes: Tensor) -> Tensor:
        x = self.embed(codes) + self.pos_embed.to(codes.dtype)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def cosine_distances(pred: Tensor, target: Tensor) -> Tensor:
    """``1 - cos(pred_i, target_i)`` of every patch, `(B, L)` from `(B, L, D)` each (float32)."""
    return 1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)


def cosine_reconstruction_loss(pred: Tensor, target: Tensor) -> Tensor:
    """VQ-KD's objective: ``mean over patches of 1 - cos(pred_i, target_i)``, `(B, L, D)` each."""
    return cosine_distances(pred, target).mean()


@METHODS.register("vqkd_tokenizer")
class VQKDTokenizerMethod(Method):
    """BEiT v2's VQ-KD tokenizer around a ViT backbone.

    Args:
        backbone: the tokenizer's ViT encoder (paper: ViT-B/16).
        teacher: the frozen encoder of an earlier run (``{run: runs/<name>}`` in the config),
            whose patch features the decoder reconstructs.
        codebook_size: number of codes (paper: 8192).
        code_dim: code dimension (paper: 32).
        decoder_embed_dim: decoder width (default: the encoder's).
        decoder_depth: decoder blocks (paper: 3).
        decoder_num_heads: decoder attention heads.
        decay: codebook EMA decay (paper: 0.99).
        beta: commitment weight (reference code: 1.0).
        dead_threshold: EMA cluster size under which a code is restarted (Jukebox: 1.0).
    """

    view_recipe = "single_view"
    requires_token_backbone = True
    frozen_models = ("teacher",)

    def __init__(
        self,
        backbone: nn.Module,
        teacher: nn.Module | dict[str, str] | str | None = None,
        codebook_size: int = 8192,
        code_dim: int = 32,
        decoder_embed_dim: int | None = None,
        decoder_depth: int = 3,
        decoder_num_heads: int = 4,
        decay: float = 0.99,
        beta: float = 1.0,
        dead_threshold: float = 1.0,
    ) -> None:
        super().__init__()
        check_token_backbone(backbone, "vqkd_tokenizer")
        if not isinstance(teacher, nn.Module):  # the engine turns a run folder into the module
            raise ValueError(
                f"vqkd_tokenizer needs method.teacher (got {teacher!r}): the folder of a finished run whose "
                "patch features the codes distil (e.g. method.teacher=runs/dino-fashion-mnist-...)"
            )
        if not (hasattr(teacher, "forward_tokens") or hasattr(teacher, "forward_features")):
            where = getattr(teacher, "loaded_from", None) or "<given module>"
            raise ValueError(
                f"the teacher run at {where} holds a {type(teacher).__name__}, which gives no patch features; "
                "give method.teacher the run of a ViT or ConvNet/ResNet backbone"
            )
        vit = as_token_backbone(backbone)
        self.backbone = backbone
        self.teacher = teacher.requires_grad_(False).eval()
        width = int(vit.embed_dim)
        self.encode_head = task_layer(width, width, code_dim)
        self.quantizer = VectorQuantizer(
            codebook_size, code_dim, decay=decay, beta=beta, cosine=True, dead_threshold=dead_threshold
        )
        self.decoder = VQKDDecoder(
            code_dim,
            vit.grid_size,
            decoder_embed_dim or width,
            decoder_depth,
            decoder_num_heads,
            feature_map_dim(teacher),
        )
        # What rebuilds the tokenizer from a run's backbone.safetensors (``build_embedder``).
        self._spec = {
            "code_dim": code_dim,
            "codebook_size": codebook_size,
            "decay": decay,
            "beta": beta,
            "dead_threshold": dead_threshold,
        }

    @property
    def tokenizer(self) -> VQKDTokenizer:
        """The encoder, encode head and codebook as one module (shares their parameters)."""
        return VQKDTokenizer(self.backbone, self.encode_head, self.quantizer)

    @torch.no_grad()
    def teacher_targets(self, images: Tensor) -> Tensor:
        """The teacher's patch features `(B, L, D_t)` on the tokenizer's patch grid."""
        fmap = feature_map(self.teacher, images).float()
        grid = as_token_backbone(self.backbone).grid_size
        if tuple(fmap.shape[-2:]) != tuple(grid):
            fmap = F.interpolate(fmap, size=grid, mode="bilinear", align_corners=False, antialias=True)
        return fmap.flatten(2).transpose(1, 2)

    def decode_tokens(self, x: Tensor) -> tuple[Tensor, Quantized]:
        """The decoder's teacher-feature predictions `(B, L, D_t)` from the tokens of images
        `(B, C, H, W)` (straight-through) and the quantiser's output."""
        z = self.encode_head(as_token_backbone(self.backbone).forward_tokens(x)[:, 1:])  # = tokenizer.encode
        q = self.quantizer(z)
        return self.decoder(q.quantized.to(z.dtype)), q

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        x = batch.views[0]
        pred, q = self.decode_tokens(x)
        rec_loss = cosine_reconstruction_loss(pred, self.teacher_targets(x))
        return {
            "loss": rec_loss + q.commitment_loss,
            "reconstruction_loss": rec_loss.detach(),
            "commitment_loss": q.commitment_loss.detach(),
            "perplexity": q.perplexity,
            "dead_codes": self.quantizer.dead_codes(),
            # For the codebook's EMA in on_step_end (after the optimiser step).
            "encodings": q.encodings.detach().reshape(-1, q.encodings.shape[-1]),
            "ids": q.ids.reshape(-1),
        }

    def on_step_end(self, step: StepInfo, outputs: StepOutputs) -> None:
        # Restart draws from a generator seeded by the step: alike on every process and on resume.
        generator = torch.Generator().manual_seed(step.step)
        self.quantizer.ema_update(outputs["encodings"], outputs["ids"], generator)

    def evaluate_tokens(self, batches: Iterable[Tensor]) -> dict[str, float]:
        """Test metrics (see ``Method.evaluate_tokens``); ``tokenizer_reconstruction`` is the
        training's reconstruction term: ``1 - cos`` between the decoder's output and the frozen
        teacher's patch features, averaged over every patch of every image (commitment
        excluded)."""

        def measure(x: Tensor) -> tuple[Tensor, Tensor]:
            pred, q = self.decode_tokens(x)
            return cosine_distances(pred, self.teacher_targets(x)), q.ids

        return evaluate_tokenizer(self, batches, measure, self.quantizer.codebook_size)

    def embedder(self) -> tuple[nn.Module, dict[str, Any] | None]:
        """The tokenizer (ViT, encode head, codebook), so a BEiT run can load it; its
        ``forward`` is the ViT's, so evaluation sees the plain encoder."""
        return self.tokenizer, {"kind": "vqkd", **self._spec}

    @classmethod
    def build_embedder(cls, spec: Mapping[str, Any], backbone: Callable[[], nn.Module]) -> nn.Module:
        encoder = backbone()
        width = int(as_token_backbone(encoder).embed_dim)
        quantizer = VectorQuantizer(
            int(spec["codebook_size"]),
            int(spec["code_dim"]),
            decay=float(spec["decay"]),
            beta=float(spec["beta"]),
            cosine=True,
            dead_threshold=float(spec["dead_threshold"]),
        )
        return VQKDTokenizer(encoder, task_layer(width, width, int(spec["code_dim"])), quantizer)
