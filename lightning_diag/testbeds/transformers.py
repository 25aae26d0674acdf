"""Small causal transformer language models, sized for CPU experiments.

- :class:`TinyGPT`: a hand-written GPT whose attention calls ``F.scaled_dot_product_attention``,
  pre-LN (nanoGPT) or post-LN (the original transformer), with optional qk-layernorm (Wortsman et
  al. 2023, the attention-logit stabiliser).
- :class:`MHAGPT`: the same shape of model built from PyTorch's own ``nn.TransformerEncoderLayer``
  (``nn.MultiheadAttention`` inside, default initialisation), pre-LN (``norm_first=True``) or post-LN,
  with a causal mask: the model a new user writes first.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MHAGPT", "TinyGPT"]


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    if sizes["n_embd"] % sizes["n_head"]:
        raise ValueError(f"`n_head` must divide `n_embd`, got n_embd={sizes['n_embd']}, n_head={sizes['n_head']}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused ``qkv`` projection and an output ``proj``.

    ``q_norm`` and ``k_norm`` are per-head LayerNorms when ``qk_layernorm`` is set (Wortsman et al.
    2023, arXiv 2309.14322) and ``nn.Identity`` otherwise; either way a forward hook on them sees
    the queries and keys, shape (B, n_head, T, head_dim), that the attention logits
    q k^T / sqrt(head_dim) are made of.
    """

    def __init__(self, n_embd: int, n_head: int, qk_layernorm: bool = False) -> None:
        super().__init__()
        self.n_head, self.head_dim = n_head, n_embd // n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.q_norm: nn.Module = nn.LayerNorm(self.head_dim) if qk_layernorm else nn.Identity()
        self.k_norm: nn.Module = nn.LayerNorm(self.head_dim) if qk_layernorm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """Position-wise feed-forward: ``fc`` (d -> 4d), GELU, ``proj`` (4d -> d)."""

    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """Transformer block. Pre-LN: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``; post-LN:
    ``ln1(x + attn(x))`` then ``ln2(x + mlp(x))``."""

    def __init__(self, n_embd: int, n_head: int, qk_layernorm: bool = False, norm_first: bool = True) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, qk_layernorm)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x: Tensor) -> Tensor:
        if self.norm_first:
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.mlp(x))


class _CharModel(nn.Module):
    """Token and position embeddings in, ``lm_head(ln_f(layers(x)))`` out: what both models share.
    Subclasses build their layers between :meth:`_embeddings` and :meth:`_head` (that order fixes
    the draws of the initialisation) and run them in :meth:`layers_forward`."""

    def _embeddings(self, vocab_size: int, block_size: int, n_embd: int) -> None:
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)

    def _head(self, vocab_size: int, n_embd: int, norm_first: bool) -> None:
        self.ln_f: nn.Module = nn.LayerNorm(n_embd) if norm_first else nn.Identity()
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)

    def layers_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, idx: Tensor) -> Tensor:
        """Logits of the next token, shape (B, T, vocab_size), for token ids ``idx`` of shape (B, T)."""
        T = idx.shape[1]
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.block_size}")
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device))
        return self.lm_head(self.ln_f(self.layers_forward(x)))


class TinyGPT(_CharModel):
    """A GPT-style character model, after nanoGPT, sized for CPU experiments.

    Modules: ``tok_emb``, ``pos_emb`` (embeddings), ``blocks.{i}.ln1``, ``blocks.{i}.attn.qkv``
    (fused q, k, v), ``blocks.{i}.attn.q_norm``/``k_norm``, ``blocks.{i}.attn.proj``,
    ``blocks.{i}.ln2``, ``blocks.{i}.mlp.fc``, ``blocks.{i}.mlp.proj``, ``ln_f`` (``nn.Identity``
    for post-LN, whose blocks end in a LayerNorm) and ``lm_head`` (untied from ``tok_emb``). Weights
    are N(0, 0.02), residual projections (``attn.proj``, ``mlp.proj``) N(0, 0.02 / sqrt(2 n_layer))
    as in GPT-2, biases zero. No dropout.

    Args:
        vocab_size: number of tokens.
        block_size: longest sequence (number of positions).
        n_layer: transformer blocks.
        n_head: attention heads; must divide ``n_embd``.
        n_embd: model width.
        qk_layernorm: LayerNorm on queries and keys per head (Wortsman et al. 2023).
        norm_first: pre-LN blocks (True) or post-LN blocks (False).

    Example:
        >>> model = TinyGPT(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=16)
        >>> model(torch.zeros(3, 5, dtype=torch.long)).shape
        torch.Size([3, 5, 10])
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 64,
        n_layer: int = 3,
        n_head: int = 4,
        n_embd: int = 64,
        qk_layernorm: bool = False,
        norm_first: bool = True,
    ) -> None:
        super().__init__()
        _check_sizes(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        self._embeddings(vocab_size, block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, qk_layernorm, norm_first) for _ in range(n_layer))
        self._head(vocab_size, n_embd, norm_first)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                # GPT-2: scale the residual-stream writes down with depth so the stream's variance stays put.
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith((".attn.proj", ".mlp.proj")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def layers_forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class MHAGPT(_CharModel):
    """A causal character model of ``nn.TransformerEncoderLayer`` blocks (``nn.MultiheadAttention``).

    Modules: ``tok_emb``, ``pos_emb`` (N(0, 0.02)), ``layers.{i}`` (``nn.TransformerEncoderLayer``
    with ``self_attn`` (``in_proj_weight`` fused q, k, v, and ``out_proj``), ``linear1``,
    ``linear2``, ``norm1``, ``norm2``; GELU, feed-forward width 4d, no dropout, PyTorch's default
    initialisation), ``ln_f`` (``nn.Identity`` for post-LN) and ``lm_head`` (N(0, 0.02), no bias).
    Causality comes from a boolean upper-triangular mask.

    Args:
        vocab_size, block_size, n_layer, n_head, n_embd: as for :class:`TinyGPT`.
        norm_first: pre-LN layers (True) or post-LN layers (False, ``nn.TransformerEncoderLayer``'s default).

    Example:
        >>> model = MHAGPT(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=16)
        >>> model(torch.zeros(3, 5, dtype=torch.long)).shape
        torch.Size([3, 5, 10])
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 64,
        n_layer: int = 2,
        n_head: int = 4,
        n_embd: int = 64,
        norm_first: bool = True,
    ) -> None:
        super().__init__()
        _check_sizes(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        self._embeddings(vocab_size, block_size, n_embd)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(n_embd, n_head, dim_feedforward=4 * n_embd, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=norm_first)
            for _ in range(n_layer)
        )  # fmt: skip
        self._head(vocab_size, n_embd, norm_first)
        for module in (self.tok_emb, self.pos_emb, self.lm_head):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        self.register_buffer("causal", torch.ones(block_size, block_size).triu(1).bool(), persistent=False)

    def layers_forward(self, x: Tensor) -> Tensor:
        mask = self.causal[: x.shape[1], : x.shape[1]]
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=True)
        return x
