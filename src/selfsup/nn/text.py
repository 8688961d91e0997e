"""The text side of image-text models: a byte-level BPE tokenizer and a causal transformer.

* :class:`BPETokenizer` trains a byte-level BPE vocabulary on captions with the
  ``tokenizers`` package (optional: ``pip install selfsup[clip]``), encodes captions into
  ``<sot> tokens <eot> <pad>...`` rows of a fixed context length and serialises itself as
  JSON (a run keeps it next to its weights, so evaluation re-tokenises identically).
* :class:`TextTransformer` is CLIP's text encoder in small: token and position embeddings,
  pre-norm transformer blocks under a causal mask, a final LayerNorm, the activation at the
  end-of-text token (:func:`pool_eot`) and a linear projection into the joint space.

References: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision" (CLIP), arXiv:2103.00020, sec. 2.4: "a 63M-parameter 12-layer 512-wide model
with 8 attention heads ... lower-cased byte pair encoding (BPE) ... max sequence length 76 ...
bracketed with [SOS] and [EOS] tokens and the activations of the highest layer of the
transformer at the [EOS] token are treated as the feature representation of the text which is
layer normalized and then linearly projected into the multi-modal embedding space. Masked
self-attention was used in the text encoder"; Sennrich et al. 2016 (BPE); Radford et al. 2019
(GPT-2) for the byte-level variant.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PAD, SOT, EOT = "<pad>", "<sot>", "<eot>"
#: Special tokens, ids 0, 1, 2 in this order (padding is id 0).
SPECIAL_TOKENS = (PAD, SOT, EOT)
INSTALL_HINT = "CLIP's text side needs the `tokenizers` package: pip install selfsup[clip]"


def _tokenizers() -> Any:
    """The ``tokenizers`` module, or a one-line ``ImportError`` naming the extra to install."""
    try:
        import tokenizers
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return tokenizers


class BPETokenizer:
    """Byte-level BPE over captions: ``encode`` gives ``(B, context_length)`` int64 ids.

    Every caption becomes ``<sot> t_1 ... t_n <eot>`` followed by ``<pad>`` (id 0); a caption
    with more than ``context_length - 2`` tokens keeps its first ones and still ends in
    ``<eot>`` (CLIP truncates the same way), so the end-of-text position always exists.
    Byte-level: any string is encodable, and ``decode(encode(s)) == s`` for untruncated
    captions.

    Args:
        tokenizer: a trained ``tokenizers.Tokenizer`` with the special tokens of
            :data:`SPECIAL_TOKENS` at ids 0, 1, 2.
        context_length: length ``L`` of an encoded row (CLIP: 77).
    """

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        if context_length < 3:
            raise ValueError(f"context_length={context_length} leaves no room for a token: use >= 3")
        ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        if ids != [0, 1, 2]:
            raise ValueError(f"tokenizer must have {', '.join(SPECIAL_TOKENS)} at ids 0, 1, 2, got {ids}")
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.pad_id, self.sot_id, self.eot_id = 0, 1, 2

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int, context_length: int) -> BPETokenizer:
        """Learn ``vocab_size`` tokens (256 bytes + 3 special + merges) from ``texts``.

        Deterministic: the same texts in the same order give the same vocabulary.
        """
        tk = _tokenizers()
        minimum = 256 + len(SPECIAL_TOKENS)
        if vocab_size < minimum:
            raise ValueError(
                f"vocab_size={vocab_size} is below the {minimum} byte and special tokens: use >= {minimum}"
            )
        tokenizer = tk.Tokenizer(tk.models.BPE())
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(list(texts), trainer=trainer)
        return cls(tokenizer, context_length)

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        """The tokenizer that :meth:`to_json` wrote."""
        tk = _tokenizers()
        data = json.loads(text)
        return cls(tk.Tokenizer.from_str(json.dumps(data["tokenizer"])), int(data["context_length"]))

    def to_json(self) -> str:
        """The vocabulary, merges and context length as one JSON document."""
        return json.dumps({"context_length": self.context_length, "tokenizer": json.loads(self.tokenizer.to_str())})

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """The number of BPE tokens of each text (without ``<sot>`` / ``<eot>``)."""
        return [len(e.ids) for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, texts: Sequence[str]) -> Tensor:
        """``B`` captions -> ``(B, context_length)`` int64 ids (see the class docstring)."""
        width = self.context_length - 2
        rows = [e.ids[:width] for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]
        out = torch.full((len(rows), self.context_length), self.pad_id, dtype=torch.int64)
        for i, ids in enumerate(rows):  # string work: the ids are ragged Python lists
            out[i, : len(ids) + 2] = torch.tensor([self.sot_id, *ids, self.eot_id], dtype=torch.int64)
        return out

    def decode(self, ids: Tensor) -> list[str]:
        """``(B, L)`` ids -> the ``B`` texts between ``<sot>`` and the first ``<eot>``."""
        texts = []
        for row in ids.tolist():
            end = row.index(self.eot_id) if self.eot_id in row else len(row)
            texts.append(self.tokenizer.decode([t for t in row[:end] if t > 2]))
        return texts


def eot_positions(ids: Tensor, eot_id: int) -> Tensor:
    """``(B,)`` position of the first end-of-text token of each ``(B, L)`` row.

    CLIP takes ``argmax(ids)`` because its EOT has the largest id; here the EOT id is explicit,
    so any vocabulary order works. A row without EOT raises: pooling would read padding.
    """
    is_eot = ids == eot_id
    if not bool(is_eot.any(1).all()):
        raise ValueError("every token row needs an end-of-text token (encode with BPETokenizer.encode)")
    return is_eot.to(torch.int64).argmax(1)  # argmax returns the first maximum


def pool_eot(hidden: Tensor, ids: Tensor, eot_id: int) -> Tensor:
    """``(B, L, D)`` activations -> ``(B, D)`` the activation at each row's end-of-text token.

    Under the causal mask the EOT position has attended to the whole caption and to none of
    the padding after it, so padding never changes the pooled feature.
    """
    pos = eot_positions(ids, eot_id)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]


class CausalBlock(nn.Module):
    """Pre-norm transformer block with causal multi-head self-attention: ``(B, L, D) -> (B, L, D)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"text width {dim} is not divisible by text_heads={num_heads}")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class TextTransformer(nn.Module):
    """CLIP's text encoder: ``(B, L)`` token ids -> ``(B, out_dim)`` (unnormalised) embeddings.

    Args:
        vocab_size: number of token ids.
        context_length: ``L``, the positions with a learned embedding (CLIP: 77).
        width: transformer width (CLIP: 512).
        depth: number of blocks (CLIP: 12).
        num_heads: attention heads (CLIP: 8).
        out_dim: size of the projection into the joint embedding space (CLIP: 512).
        eot_id: id of the end-of-text token whose activation is pooled.
    """

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        width: int = 512,
        depth: int = 12,
        num_heads: int = 8,
        out_dim: int = 512,
        eot_id: int = 2,
    ) -> None:
        super().__init__()
        self.context_length = context_length
        self.eot_id = eot_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList(CausalBlock(width, num_heads) for _ in range(depth))
        self.ln_final = nn.LayerNorm(width)
        self.projection = nn.Linear(width, out_dim, bias=False)
        # CLIP's initialisation: small token (0.02) and position (0.01) embeddings, and a
        # projection scaled by width^-0.5 so the joint-space features start at unit scale.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.projection.weight, std=width**-0.5)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.ndim != 2 or ids.shape[1] > self.context_length:
            raise ValueError(f"token ids must be (B, L) with L <= {self.context_length}, got {tuple(ids.shape)}")
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.projection(pool_eot(self.ln_final(x), ids, self.eot_id))
