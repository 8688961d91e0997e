"""BEiT stage 1: a patch-wise VQ-VAE that turns an image into a grid of discrete visual tokens.

References: Bao, Dong, Piao & Wei, "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022
(arXiv:2106.08254), Section 2.2; van den Oord, Vinyals & Kavukcuoglu, "Neural Discrete
Representation Learning" (VQ-VAE), NeurIPS 2017 (arXiv:1711.00937); Razavi et al. 2019,
"VQ-VAE-2" (arXiv:1906.00446).

Pseudocode::

    z = encoder(x)                         # (B, L, D): one encoding per p x p patch
    e, ids = quantize(z)                   # nearest code of an EMA codebook, (B, L, D), (B, L)
    x_hat = decoder(z + sg[e - z])         # straight-through: gradients skip the argmin
    loss = mse(x_hat, x) + beta * mse(z, sg[e])       # beta = 0.25
    on_step_end: EMA of the codebook from (z, ids); dead codes restarted at batch encodings

Why a VQ-VAE with an EMA codebook rather than BEiT's dVAE with Gumbel-softmax: BEiT itself
borrowed DALL-E's tokenizer, trained on 250M images with a temperature annealed from 1 to
1/16 and a KL weight ramp; on a small data set with a short schedule that annealing is the
fragile part (too fast and codes freeze, too slow and the decoder learns from soft mixtures it
never sees at tokenization time). The EMA codebook has no temperature and no schedule: each
code moves to the running mean of the encodings it wins (k-means online), which VQ-VAE-2
reports as faster and more stable than gradient codebook updates, and dead codes are restarted
from the data, so codebook usage is monitored and repaired rather than tuned. The tokens BEiT
predicts are the same in both cases: one id per patch from a codebook.

The encoder is a small ConvNet that ends on the patch grid (a stride-``p`` convolution), so
each token sees its patch and a few pixels around it, as DALL-E's dVAE tokens do; the
configured backbone is not used (the engine always builds one): the evaluated encoder is this
ConvNet, whose mean-pooled encodings are the tokenizer's ``embed`` features.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.methods.base import Batch, Method, StepInfo, StepOutputs
from selfsup.nn.quantizer import Quantized, VectorQuantizer
from selfsup.registry import METHODS


def evaluate_tokenizer(
    method: nn.Module,
    batches: Iterable[Tensor],
    measure: Callable[[Tensor], tuple[Tensor, Tensor]],
    codebook_size: int,
) -> dict[str, float]:
    """A tokenizer's test metrics over a whole split (``Method.evaluate_tokens``).

    ``measure(x)`` gives, for images `(B, C, H, W)`, the terms whose mean is the method's
    reconstruction objective (any shape, e.g. squared errors `(B, C, H, W)` or per-patch
    ``1 - cos`` `(B, L)`) and the code ids `(B, L)`. The terms are summed in float64 and the
    ids histogrammed on the device over every batch, so the metrics are those of the whole
    split, not averages of per-batch values: ``tokenizer_reconstruction`` = sum of terms /
    number of terms (every image has as many, so it is also the mean over images),
    ``codebook_usage`` = fraction of the ``codebook_size`` codes used at least once,
    ``codebook_perplexity`` = ``exp(-sum_k p_k log p_k)`` of the code frequencies ``p``.
    ``method`` runs in eval mode without gradients and gets its previous mode back.
    """
    was_training = method.training
    method.eval()
    total: Tensor | None = None
    terms = 0
    counts: Tensor | None = None
    try:
        with torch.no_grad():
            for x in batches:
                errors, ids = measure(x)
                batch_sum = errors.double().sum()
                hist = torch.bincount(ids.reshape(-1), minlength=codebook_size)
                total = batch_sum if total is None else total + batch_sum
                counts = hist if counts is None else counts + hist
                terms += errors.numel()
    finally:
        method.train(was_training)
    if total is None or counts is None or terms == 0:
        raise ValueError("the evaluation split has no images: a tokenizer needs at least one to be measured")
    p = counts.double() / counts.sum()
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum()  # 0 log 0 = 0
    return {
        "tokenizer_reconstruction": float(total) / terms,
        "codebook_usage": float((counts > 0).double().mean()),
        "codebook_perplexity": float(torch.exp(entropy)),
        "codebook_size": float(codebook_size),
    }


class ResBlock(nn.Module):
    """VQ-VAE's residual block: ``x + conv1x1(relu(conv3x3(relu(x))))``, `(B, C, H, W)`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class Tokenizer(nn.Module):
    """What a tokenizer run's ``backbone.safetensors`` holds and BEiT loads: images to code ids.

    Interface (shared by :class:`VQVAETokenizer` and ``vqkd_tokenizer``'s ``VQKDTokenizer``):
    ``forward(x)`` `(B, C, H, W) -> (B, num_features)` evaluation features; ``encode(x)`` the
    pre-quantisation encodings `(B, L, D)`; ``tokenize(x)`` code ids `(B, L)` on the row-major
    patch grid; attributes ``quantizer``, ``codebook_size``, ``patch_size``, ``grid_size``,
    ``num_patches``, ``num_features``.
    """

    quantizer: VectorQuantizer
    patch_size: int
    grid_size: tuple[int, int]

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def tokenize(self, x: Tensor) -> Tensor:
        """Code ids `(B, L)` of images `(B, C, H, W)`."""
        return self.quantizer.tokenize(self.encode(x))


class VQVAETokenizer(Tokenizer):
    """Patch-wise VQ-VAE: conv encoder to the patch grid, EMA codebook, conv decoder to pixels.

    Args:
        in_channels: image channels ``C``.
        image_size: image side ``S`` (a multiple of ``patch_size``).
        patch_size: pixels per token side ``p`` (the BEiT ViT's patch size it must match).
        hidden_dim: ConvNet width (VQ-VAE: 256).
        code_dim: code dimension ``D``.
        codebook_size: number of codes ``K`` (BEiT / DALL-E: 8192).
        num_res_blocks: residual blocks on each side of the bottleneck (VQ-VAE: 2).
        decay, beta, dead_threshold: of the :class:`VectorQuantizer` (VQ-VAE: 0.99, 0.25).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        patch_size: int = 4,
        hidden_dim: int = 64,
        code_dim: int = 32,
        codebook_size: int = 8192,
        num_res_blocks: int = 2,
        decay: float = 0.99,
        beta: float = 0.25,
        dead_threshold: float = 1.0,
    ) -> None:
        super().__init__()
        self._spec = {
            "in_channels": in_channels,
            "image_size": image_size,
            "patch_size": patch_size,
            "hidden_dim": hidden_dim,
            "code_dim": code_dim,
            "codebook_size": codebook_size,
            "num_res_blocks": num_res_blocks,
            "decay": decay,
            "beta": beta,
            "dead_threshold": dead_threshold,
        }
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(f"patch_size {patch_size} must divide the image size {image_size}")
        self.in_channels = in_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        self.num_features = code_dim
        h = hidden_dim
        # Only one convolution at full resolution on each side: the residual blocks run on the
        # patch grid, where they cost p^2 times less.
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, h, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(h, h, patch_size, stride=patch_size),  # one cell per patch
            *(ResBlock(h) for _ in range(num_res_blocks)),
            nn.ReLU(),
            nn.Conv2d(h, code_dim, 1),
        )
        self.quantizer = VectorQuantizer(codebook_size, code_dim, decay=decay, beta=beta, dead_threshold=dead_threshold)
        self.decoder = nn.Sequential(
            nn.Conv2d(code_dim, h, 1),
            *(ResBlock(h) for _ in range(num_res_blocks)),
            nn.ReLU(),
            nn.ConvTranspose2d(h, h, patch_size, stride=patch_size),
            nn.ReLU(),
            nn.Conv2d(h, in_channels, 3, padding=1),
        )

    def spec(self) -> dict[str, Any]:
        """The constructor arguments (JSON-able) that rebuild this tokenizer untrained."""
        return dict(self._spec)

    def encode(self, x: Tensor) -> Tensor:
        """Encodings `(B, L, D)` of images `(B, C, H, W)`, row-major over the patch grid."""
        return self.encoder(x).flatten(2).transpose(1, 2)

    def decode(self, codes: Tensor) -> Tensor:
        """Images `(B, C, H, W)` from code vectors `(B, L, D)` on the patch grid."""
        gh, gw = self.grid_size
        return self.decoder(codes.transpose(1, 2).reshape(codes.shape[0], -1, gh, gw))

    def decode_ids(self, ids: Tensor) -> Tensor:
        """Images `(B, C, H, W)` from code ids `(B, L)`."""
        return self.decode(self.quantizer.embed_ids(ids))

    def forward(self, x: Tensor) -> Tensor:
        """`(B, C, H, W) -> (B, D)`: the encodings averaged over the patch grid."""
        return self.encode(x).mean(dim=1)


@METHODS.register("vq_tokenizer")
class VQTokenizer(Method):
    """BEiT's visual tokenizer, trained here as a VQ-VAE (see the module docstring).

    Args:
        backbone: unused (the tokenizer is its own ConvNet; the engine builds a backbone for
            every method).
        in_channels: image channels (filled in by the engine).
        image_size: image side (filled in by the engine).
        patch_size: pixels per token side; must equal the BEiT ViT's patch size.
        hidden_dim: ConvNet width (VQ-VAE: 256).
        code_dim: code dimension.
        codebook_size: number of codes (BEiT's DALL-E tokenizer: 8192).
        num_res_blocks: residual blocks per side (VQ-VAE: 2).
        decay: codebook EMA decay (VQ-VAE: 0.99).
        beta: commitment weight (VQ-VAE: 0.25).
        dead_threshold: EMA cluster size under which a code is restarted (Jukebox: 1.0).
    """

    view_recipe = "single_view"
    engine_facts = ("in_channels", "image_size")
    #: Titles of the two images ``reconstruct`` returns (``selfsup visualize reconstruction``).
    reconstruction_titles = ("decoded, unquantised", "decoded tokens")

    def __init__(
        self,
        backbone: nn.Module | None = None,
        in_channels: int = 3,
        image_size: int = 224,
        patch_size: int = 4,
        hidden_dim: int = 64,
        code_dim: int = 32,
        codebook_size: int = 8192,
        num_res_blocks: int = 2,
        decay: float = 0.99,
        beta: float = 0.25,
        dead_threshold: float = 1.0,
    ) -> None:
        super().__init__()
        self.backbone = VQVAETokenizer(
            in_channels,
            image_size,
            patch_size,
            hidden_dim,
            code_dim,
            codebook_size,
            num_res_blocks,
            decay,
            beta,
            dead_threshold,
        )

    @property
    def tokenizer(self) -> VQVAETokenizer:
        """The tokenizer (it is the method's ``backbone``: its encoder is what ``embed`` uses)."""
        return cast(VQVAETokenizer, self.backbone)

    def decode_tokens(self, x: Tensor) -> tuple[Tensor, Quantized]:
        """The images decoded from their tokens `(B, C, H, W)` (straight-through, so the
        encoder gets the reconstruction's gradient) and the quantiser's output."""
        z = self.tokenizer.encode(x)
        q = self.tokenizer.quantizer(z)
        return self.tokenizer.decode(q.quantized.to(z.dtype)), q

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        x = batch.views[0]
        recon, q = self.decode_tokens(x)
        rec_loss = F.mse_loss(recon.float(), x.float())
        return {
            "loss": rec_loss + q.commitment_loss,
            "reconstruction_loss": rec_loss.detach(),
            "commitment_loss": q.commitment_loss.detach(),
            "perplexity": q.perplexity,
            "dead_codes": self.tokenizer.quantizer.dead_codes(),
            # For the codebook's EMA in on_step_end (after the optimiser step).
            "encodings": q.encodings.detach().reshape(-1, q.encodings.shape[-1]),
            "ids": q.ids.reshape(-1),
        }

    def on_step_end(self, step: StepInfo, outputs: StepOutputs) -> None:
        # Restart draws come from a generator seeded by the step: the same on every process
        # and after a resume, and independent of the global random stream.
        generator = torch.Generator().manual_seed(step.step)
        self.tokenizer.quantizer.ema_update(outputs["encodings"], outputs["ids"], generator)

    def evaluate_tokens(self, batches: Iterable[Tensor]) -> dict[str, float]:
        """Test metrics (see ``Method.evaluate_tokens``); ``tokenizer_reconstruction`` is the
        training's reconstruction term: the MSE between the images decoded from their tokens
        and the inputs, in the normalised pixel space the model sees (commitment excluded)."""

        def measure(x: Tensor) -> tuple[Tensor, Tensor]:
            recon, q = self.decode_tokens(x)
            return (recon.float() - x.float()).pow(2), q.ids

        return evaluate_tokenizer(self, batches, measure, self.tokenizer.codebook_size)

    def embedder(self) -> tuple[nn.Module, dict[str, Any] | None]:
        """The whole tokenizer (encoder, codebook, decoder), so a BEiT run can load it."""
        return self.tokenizer, {"kind": "vq", **self.tokenizer.spec()}

    @classmethod
    def build_embedder(cls, spec: Mapping[str, Any], backbone: Callable[[], nn.Module]) -> nn.Module:
        return VQVAETokenizer(**{k: v for k, v in spec.items() if k != "kind"})

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(decoded encodings, decoded tokens)``, both `(B, C, H, W)` in the input's units:
        the decoder on the continuous encodings, and on their nearest codes (what the tokens
        keep of the image)."""
        z = self.tokenizer.encode(images)
        ids = self.tokenizer.quantizer.tokenize(z)
        return self.tokenizer.decode(z), self.tokenizer.decode_ids(ids)
