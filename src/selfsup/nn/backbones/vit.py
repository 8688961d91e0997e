"""Vision Transformer backbone with a token-level interface for masked image modelling.

References: Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words", arXiv:2010.11929;
He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners", arXiv:2111.06377.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.registry import BACKBONES

__all__ = [
    "PatchEmbed",
    "Attention",
    "Mlp",
    "DropPath",
    "Block",
    "VisionTransformer",
    "sincos_pos_embed_2d",
    "without_drop_path",
    "vit_tiny",
    "vit_small",
    "vit_base",
]

_POS_EMBEDS = ("sincos", "learned")
_POOLS = ("cls", "avg")


def sincos_pos_embed_2d(embed_dim: int, grid_h: int, grid_w: int, device: torch.device | None = None) -> Tensor:
    """Return fixed 2-D sine-cosine position embeddings `(grid_h * grid_w, embed_dim)`.

    Rows follow the row-major patch order. As in the MAE reference code, the first half of
    the channels encodes the column (x) coordinate and the second half the row (y), each as
    ``[sin(pos * w_k), cos(pos * w_k)]`` with ``w_k = 10000 ** (-k / (D / 4))``; keeping that
    convention lets MAE-pretrained weights be loaded unchanged.

    Args:
        embed_dim: ``D``, divisible by 4.
        grid_h: number of patch rows.
        grid_w: number of patch columns.
        device: device of the result.

    Returns:
        `(grid_h * grid_w, D)` float32 embeddings.

    References: He et al. 2021, MAE, arXiv:2111.06377; Vaswani et al. 2017, arXiv:1706.03762.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embeddings need embed_dim % 4 == 0, got {embed_dim}")
    quarter = embed_dim // 4
    # float64 so large grids do not lose precision in pos * omega before the sin/cos.
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64, device=device),
        torch.arange(grid_w, dtype=torch.float64, device=device),
        indexing="ij",
    )

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(xs), encode(ys)], dim=1).float()


class PatchEmbed(nn.Module):
    """Embed non-overlapping ``p x p`` patches of `(B, C, H, W)` into tokens `(B, L, D)`.

    A stride-``p`` convolution, equivalent to a linear map of each flattened patch.

    References: Dosovitskiy et al. 2020, ViT, arXiv:2010.11929.
    """

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """Return tokens `(B, (H / p) * (W / p), D)` in row-major patch order."""
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not divisible by patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention over tokens `(B, N, D)` using fused SDPA.

    References: Vaswani et al. 2017, "Attention Is All You Need", arXiv:1706.03762.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]  # each (B, heads, N, head_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Return attended tokens `(B, N, D)`."""
        b, n, d = x.shape
        q, k, v = self._qkv(x)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def attention_weights(self, x: Tensor) -> Tensor:
        """Return the softmax attention weights `(B, heads, N, N)`, each row summing to 1.

        Computed explicitly (in float32) because SDPA does not expose its weights.
        """
        q, k, _ = self._qkv(x)
        # Outside autocast, or the float32 casts below would be undone for the matmul.
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = (q.float() * self.scale) @ k.float().transpose(-2, -1)
            return logits.softmax(dim=-1)


class Mlp(nn.Module):
    """Two-layer GELU MLP applied to each token, `(B, N, D) -> (B, N, D)`.

    References: Dosovitskiy et al. 2020, ViT, arXiv:2010.11929.
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Return `(B, N, D)`."""
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch per sample with probability ``p`` in training.

    Surviving samples are scaled by ``1 / (1 - p)`` so the expectation is unchanged.

    References: Huang et al. 2016, "Deep Networks with Stochastic Depth", arXiv:1603.09382.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """Return `x` `(B, ...)` with whole samples dropped in training mode."""
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def without_drop_path(module: nn.Module) -> nn.Module:
    """Switch off every :class:`DropPath` inside ``module`` (in place) and return it.

    For EMA teachers: a teacher is a copy of the student, so it inherits the student's
    stochastic depth, but its targets must come from the whole network ("drop path rate
    for student network" only, iBOT/DINOv2 reference code). The engine keeps teachers in
    training mode with the student (BatchNorm teachers use batch statistics, as in DINO), so
    the rate itself is set to 0 rather than relying on eval mode. Only the Python attribute
    ``p`` changes: parameters, buffers and the state dict are untouched.

    References: Zhou et al. 2021, iBOT, arXiv:2111.07832; Oquab et al. 2023, DINOv2,
    arXiv:2304.07193.
    """
    for m in module.modules():
        if isinstance(m, DropPath):
            m.p = 0.0
    return module


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))`` then ``x + mlp(LN(x))``, `(B, N, D)`.

    References: Dosovitskiy et al. 2020, ViT, arXiv:2010.11929.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        # eps=1e-6 as in the ViT/MAE reference implementations.
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        """Return `(B, N, D)`."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT encoder: images `(B, C, H, W)` to pooled features `(B, D)` or tokens `(B, 1 + L, D)`.

    Patch embedding (stride-``p`` conv) -> add position embeddings -> prepend the class
    token (and ``R`` register tokens after it) -> pre-norm blocks -> final LayerNorm.
    ``L = (H / p) * (W / p)`` patches in row-major order; ``num_features = embed_dim``.

    Register tokens (``num_registers = R > 0``, Darcet et al. 2023): ``R`` learned tokens
    without position embedding, inserted after the class token, that the blocks may use as
    scratch space (instead of hijacking low-information patch tokens, which is what makes
    attention maps of large ViTs noisy). They are dropped from every output below, so
    pooling, patch tokens and attention maps keep their shapes and meaning;
    :meth:`forward_all_tokens` returns them.

    Token-level contract (shared by MAE, SimMIM, BEiT, iBOT and DINO-style methods):

    * ``forward(x) -> (B, D)``: the class token after the final norm (``global_pool="cls"``)
      or the mean of the normed patch tokens (``"avg"``).
    * ``forward_tokens(x, keep_indices=None, mask=None) -> (B, 1 + L', D)``: every token
      after the final norm, class token first. Patch indices never count the class token;
      all class-token bookkeeping happens inside.

      - ``keep_indices`` `(B, L_keep)` long: patches to keep (MAE's visible set, e.g. from
        ``selfsup.nn.masking.mask_to_keep_indices``). Position embeddings are added before
        the gather, so every kept token carries its own position; ``L' = L_keep`` and the
        tokens come out in the order of ``keep_indices``.
      - ``mask`` `(B, L)` bool, **True = masked**: those patch embeddings are replaced by the
        learned ``mask_token`` before position embeddings are added (SimMIM, BEiT, iBOT);
        ``L' = L``. Needs ``use_mask_token=True`` (or :meth:`enable_mask_token`), so models
        that never mask carry no parameter without gradient (which DDP rejects).
      - Passing both is an error.
    * ``get_last_self_attention(x) -> (B, heads, 1 + L, 1 + L)``: softmax attention of the
      last block (for DINO attention maps); row ``0`` is the class token's attention. With
      registers, their rows and columns are left out (the attention is computed over all
      ``1 + R + L`` tokens, so a row then sums to 1 minus its mass on the registers).
    * Other input sizes than ``image_size`` (multi-crop local views) work: position
      embeddings are recomputed (sin-cos) or bicubically resized (learned) for the new grid
      by :meth:`interpolate_pos_encoding`.
    * Attributes: ``patch_size``, ``grid_size`` ``(h, w)``, ``num_patches``, ``embed_dim``,
      ``num_features``, ``patch_embed`` (freeze it with ``requires_grad_(False)``, as MoCo v3
      does), ``cls_token``, ``pos_embed`` `(1, 1 + L, D)` (a non-persistent buffer for
      sin-cos, a parameter when learned; the class token's slot is zero for sin-cos),
      ``mask_token`` (`(1, 1, D)` parameter or None), ``num_registers``,
      ``register_tokens`` (`(1, R, D)` parameter or None), ``blocks`` (ModuleList), ``norm``.

    Args:
        in_channels: input channels ``C``.
        image_size: side of the square training images; sets ``grid_size``.
        patch_size: side ``p`` of the square patches (must divide the image sides).
        embed_dim: token width ``D``.
        depth: number of transformer blocks (0 is allowed: patch embedding + norm only).
        num_heads: attention heads (must divide ``D``).
        mlp_ratio: MLP hidden width over ``D``.
        pos_embed: "sincos" (fixed 2-D sine-cosine, as in MAE) or "learned".
        drop_path_rate: stochastic depth rate of the last block, linearly increasing from 0.
        qkv_bias: bias in the query/key/value projection.
        global_pool: "cls" or "avg" pooling for :meth:`forward`.
        use_mask_token: create the learned ``mask_token`` used by ``forward_tokens(mask=...)``.
        num_registers: register tokens ``R`` (0: none, the plain ViT; the paper uses 4).

    References: Dosovitskiy et al. 2020, ViT, arXiv:2010.11929; He et al. 2021, MAE,
    arXiv:2111.06377 (sin-cos embeddings, keep-index encoding); Xie et al. 2021, SimMIM,
    arXiv:2111.09886 (mask token); Darcet, Oquab, Mairal & Bojanowski 2023, "Vision
    Transformers Need Registers", arXiv:2309.16588 (register tokens).
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        pos_embed: str = "sincos",
        drop_path_rate: float = 0.0,
        qkv_bias: bool = True,
        global_pool: str = "cls",
        use_mask_token: bool = False,
        num_registers: int = 0,
    ) -> None:
        super().__init__()
        if num_registers < 0:
            raise ValueError(f"num_registers must be >= 0, got {num_registers}")
        if pos_embed not in _POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {_POS_EMBEDS}, got {pos_embed!r}")
        if global_pool not in _POOLS:
            raise ValueError(f"global_pool must be one of {_POOLS}, got {global_pool!r}")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self.patch_size = patch_size
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.embed_dim = embed_dim
        self.num_features: int = embed_dim
        self.global_pool = global_pool
        self.pos_embed_type = pos_embed

        self.patch_embed = PatchEmbed(in_channels, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token: nn.Parameter | None
        self.register_parameter("mask_token", None)
        self.num_registers = num_registers
        self.register_tokens: nn.Parameter | None
        if num_registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, embed_dim))
        else:  # no parameter at all, so plain ViT checkpoints keep their keys
            self.register_parameter("register_tokens", None)
        self.pos_embed: Tensor
        if pos_embed == "sincos":
            fixed = sincos_pos_embed_2d(embed_dim, *self.grid_size)
            fixed = torch.cat([torch.zeros(1, embed_dim), fixed]).unsqueeze(0)
            # Not persistent: it is a pure function of the grid, recomputed on construction.
            self.register_buffer("pos_embed", fixed, persistent=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim))

        rates = torch.linspace(0, drop_path_rate, depth).tolist() if depth else []
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=rate) for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()
        if use_mask_token:
            self.enable_mask_token()

    def _init_weights(self) -> None:
        # MAE's recipe: xavier on the patch projection seen as a linear layer, N(0, 0.02) on
        # the tokens, xavier-uniform linears with zero bias.
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.patch_embed.proj.bias is not None:
            nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        if self.register_tokens is not None:  # initialised like the class token
            nn.init.normal_(self.register_tokens, std=0.02)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def enable_mask_token(self) -> nn.Parameter:
        """Create the learned `(1, 1, D)` ``mask_token`` if missing and return it.

        Call it before building the optimizer (e.g. in a SimMIM/iBOT method's ``__init__``).

        References: Xie et al. 2021, SimMIM, arXiv:2111.09886.
        """
        if self.mask_token is None:
            self.mask_token = nn.Parameter(torch.zeros_like(self.cls_token))
            nn.init.normal_(self.mask_token, std=0.02)
        return self.mask_token

    def set_drop_path_rate(self, rate: float) -> None:
        """Set stochastic depth as the constructor's ``drop_path_rate`` would: linearly from 0
        at the first block to ``rate`` at the last (e.g. a method whose paper fixes the
        student's rate, DINOv2 / iBOT).

        References: Huang et al. 2016, arXiv:1603.09382; Touvron et al. 2020, DeiT,
        arXiv:2012.12877.
        """
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
        rates = torch.linspace(0, rate, len(self.blocks)).tolist() if len(self.blocks) else []
        for block, r in zip(self.blocks, rates):
            assert isinstance(block, Block)
            block.drop_path.p = r  # in place: the module keeps its training/eval mode

    def interpolate_pos_encoding(self, grid_h: int, grid_w: int) -> Tensor:
        """Return position embeddings `(1, 1 + grid_h * grid_w, D)` for another patch grid.

        Sin-cos embeddings are recomputed exactly for the new grid; learned ones are resized
        bicubically over the 2-D grid (the class token's slot is kept as is). At the
        training grid the stored ``pos_embed`` is returned unchanged.

        References: Dosovitskiy et al. 2020, ViT, arXiv:2010.11929 (Section 3.2,
        fine-tuning at higher resolution); Caron et al. 2021, DINO, arXiv:2104.14294.
        """
        if (grid_h, grid_w) == self.grid_size:
            return self.pos_embed
        cls_pos = self.pos_embed[:, :1]
        if self.pos_embed_type == "sincos":
            patch_pos = sincos_pos_embed_2d(self.embed_dim, grid_h, grid_w, device=self.pos_embed.device).to(
                self.pos_embed.dtype
            )
            return torch.cat([cls_pos, patch_pos.unsqueeze(0)], dim=1)
        gh, gw = self.grid_size
        grid = self.pos_embed[:, 1:].reshape(1, gh, gw, self.embed_dim).permute(0, 3, 1, 2)
        # Bicubic in float32: the op has no bfloat16 CPU kernel and autocast leaves it alone.
        resized = F.interpolate(grid.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False).to(grid.dtype)
        patch_pos = resized.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, self.embed_dim)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def _embed(self, x: Tensor, keep_indices: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Return the input sequence `(B, 1 + R + L', D)` of the first block."""
        if keep_indices is not None and mask is not None:
            raise ValueError("pass keep_indices (MAE) or mask (SimMIM/BEiT/iBOT), not both")
        grid_h, grid_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.patch_embed(x)  # (B, L, D)
        b, num_patches, dim = tokens.shape
        if mask is not None:
            if mask.shape != (b, num_patches) or mask.dtype != torch.bool:
                raise ValueError(
                    f"mask must be a ({b}, {num_patches}) bool tensor (True = masked), got "
                    f"{mask.dtype} {tuple(mask.shape)}"
                )
            if self.mask_token is None:
                raise ValueError(
                    "this ViT has no mask_token: build it with use_mask_token=True or call "
                    "enable_mask_token() before creating the optimizer"
                )
            tokens = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        pos = self.interpolate_pos_encoding(grid_h, grid_w)
        # Positions are added before any gather so a kept token keeps its own position.
        tokens = tokens + pos[:, 1:]
        if keep_indices is not None:
            if keep_indices.dim() != 2 or keep_indices.shape[0] != b:
                raise ValueError(f"keep_indices must be ({b}, L_keep) patch indices, got {tuple(keep_indices.shape)}")
            index = keep_indices.to(torch.long).unsqueeze(-1).expand(-1, -1, dim)
            tokens = tokens.gather(1, index)
        cls = (self.cls_token + pos[:, :1]).to(tokens.dtype).expand(b, -1, -1)
        if self.register_tokens is None:
            return torch.cat([cls, tokens], dim=1)
        # Registers carry no position: they are not image locations.
        registers = self.register_tokens.to(tokens.dtype).expand(b, -1, -1)
        return torch.cat([cls, registers, tokens], dim=1)

    def _drop_registers(self, tokens: Tensor) -> Tensor:
        """`(B, 1 + R + N, ...)` -> `(B, 1 + N, ...)`: the class token and the patch tokens."""
        if not self.num_registers:
            return tokens
        return torch.cat([tokens[:, :1], tokens[:, 1 + self.num_registers :]], dim=1)

    def forward_all_tokens(self, x: Tensor, keep_indices: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Return every token `(B, 1 + R + L', D)` after the final norm: class token, the
        ``R`` register tokens, then the patch tokens (as :meth:`forward_tokens`, registers
        included; identical to it when ``num_registers == 0``).

        References: Darcet et al. 2023, "Vision Transformers Need Registers", arXiv:2309.16588.
        """
        tokens = self._embed(x, keep_indices=keep_indices, mask=mask)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward_tokens(self, x: Tensor, keep_indices: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Return all tokens `(B, 1 + L', D)` after the final norm, class token first.

        Args:
            x: images `(B, C, H, W)`; H and W divisible by ``patch_size``.
            keep_indices: `(B, L_keep)` long patch indices to keep (MAE), or None.
            mask: `(B, L)` bool, True = replace by ``mask_token`` (SimMIM/BEiT/iBOT), or None.

        Returns:
            `(B, 1 + L_keep, D)` with ``keep_indices``, else `(B, 1 + L, D)`; register tokens
            are left out.

        References: He et al. 2021, MAE, arXiv:2111.06377; Xie et al. 2021, SimMIM,
        arXiv:2111.09886.
        """
        return self._drop_registers(self.forward_all_tokens(x, keep_indices=keep_indices, mask=mask))

    def pool(self, tokens: Tensor) -> Tensor:
        """Pool normed tokens `(B, 1 + L, D)` into features `(B, D)` per ``global_pool``."""
        if self.global_pool == "cls":
            return tokens[:, 0]
        return tokens[:, 1:].mean(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """Return pooled features `(B, num_features)` for images `(B, C, H, W)`."""
        return self.pool(self.forward_tokens(x))

    def get_last_self_attention(self, x: Tensor) -> Tensor:
        """Return the last block's attention weights `(B, heads, 1 + L, 1 + L)` in float32.

        Row ``i`` is the softmax attention of token ``i`` (0 = class token) over all tokens.
        Register tokens' rows and columns are left out; the softmax ran over them too.

        References: Caron et al. 2021, DINO, arXiv:2104.14294 (attention maps).
        """
        if not self.blocks:
            raise ValueError("a depth-0 ViT has no self-attention")
        tokens = self._embed(x)
        for block in self.blocks[:-1]:
            tokens = block(tokens)
        last = self.blocks[-1]
        assert isinstance(last, Block)
        attention = last.attn.attention_weights(last.norm1(tokens))
        if not self.num_registers:
            return attention
        n = attention.shape[-1]
        keep = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(1 + self.num_registers, n)])
        keep = keep.to(attention.device)
        return attention.index_select(2, keep).index_select(3, keep)


def _vit(
    in_channels: int,
    image_size: int,
    patch_size: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float,
    pos_embed: str,
    drop_path_rate: float,
    qkv_bias: bool,
    global_pool: str,
    use_mask_token: bool,
    num_registers: int,
) -> VisionTransformer:
    return VisionTransformer(
        in_channels=in_channels,
        image_size=image_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        pos_embed=pos_embed,
        drop_path_rate=drop_path_rate,
        qkv_bias=qkv_bias,
        global_pool=global_pool,
        use_mask_token=use_mask_token,
        num_registers=num_registers,
    )


@BACKBONES.register("vit_tiny")
def vit_tiny(
    in_channels: int = 3,
    image_size: int = 224,
    patch_size: int = 16,
    embed_dim: int = 192,
    depth: int = 12,
    num_heads: int = 3,
    mlp_ratio: float = 4.0,
    pos_embed: str = "sincos",
    drop_path_rate: float = 0.0,
    qkv_bias: bool = True,
    global_pool: str = "cls",
    use_mask_token: bool = False,
    num_registers: int = 0,
) -> VisionTransformer:
    """Build ViT-Tiny (D=192, 12 blocks, 3 heads); every argument can be overridden.

    References: Touvron et al. 2020, DeiT, arXiv:2012.12877 (the Tiny configuration).
    """
    return _vit(
        in_channels, image_size, patch_size, embed_dim, depth, num_heads, mlp_ratio,
        pos_embed, drop_path_rate, qkv_bias, global_pool, use_mask_token, num_registers,
    )  # fmt: skip


@BACKBONES.register("vit_small")
def vit_small(
    in_channels: int = 3,
    image_size: int = 224,
    patch_size: int = 16,
    embed_dim: int = 384,
    depth: int = 12,
    num_heads: int = 6,
    mlp_ratio: float = 4.0,
    pos_embed: str = "sincos",
    drop_path_rate: float = 0.0,
    qkv_bias: bool = True,
    global_pool: str = "cls",
    use_mask_token: bool = False,
    num_registers: int = 0,
) -> VisionTransformer:
    """Build ViT-Small (D=384, 12 blocks, 6 heads); every argument can be overridden.

    References: Touvron et al. 2020, DeiT, arXiv:2012.12877 (the Small configuration).
    """
    return _vit(
        in_channels, image_size, patch_size, embed_dim, depth, num_heads, mlp_ratio,
        pos_embed, drop_path_rate, qkv_bias, global_pool, use_mask_token, num_registers,
    )  # fmt: skip


@BACKBONES.register("vit_base")
def vit_base(
    in_channels: int = 3,
    image_size: int = 224,
    patch_size: int = 16,
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    mlp_ratio: float = 4.0,
    pos_embed: str = "sincos",
    drop_path_rate: float = 0.0,
    qkv_bias: bool = True,
    global_pool: str = "cls",
    use_mask_token: bool = False,
    num_registers: int = 0,
) -> VisionTransformer:
    """Build ViT-Base (D=768, 12 blocks, 12 heads); every argument can be overridden.

    References: Dosovitskiy et al. 2020, ViT, arXiv:2010.11929 (Table 1).
    """
    return _vit(
        in_channels, image_size, patch_size, embed_dim, depth, num_heads, mlp_ratio,
        pos_embed, drop_path_rate, qkv_bias, global_pool, use_mask_token, num_registers,
    )  # fmt: skip
