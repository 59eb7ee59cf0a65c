"""Building blocks shared by the transformer MIL models.

* :class:`Attention`: multi-head self-attention with *separate* query, key and value projections,
  so the caller may feed the value projection a different input than query and key (TDA-MIL's
  top-down step uses ``V = W_V(x_BU + x_TD)`` with ``Q, K`` from ``x_BU``).
  By default it runs :func:`torch.nn.functional.scaled_dot_product_attention` (flash / memory-
  efficient kernels on CPU and GPU: memory linear in the number of patches); ``"explicit"`` is the
  textbook ``softmax(QK^T / sqrt(d_k)) V`` with an ``n x n`` matrix, kept as a reference for tests
  and the benchmark.
* :class:`Mlp`: ``fc1 -> GELU -> dropout -> fc2 -> dropout`` with the submodule names and
  arguments of timm's ``timm.layers.Mlp`` (so state dicts match it), written out here because
  importing timm (and torchvision behind it) would cost every federated round's fresh ClientApp
  process seconds (issue #10). With ``bias=False`` it maps 0 to 0 (GELU(0) = 0), which TDA-MIL's
  top-down decoder uses so that unselected patches (``s_i = 0``) send no top-down signal.
* :class:`Block`: pre-norm transformer block (LayerNorm -> attention -> residual -> LayerNorm ->
  MLP -> residual) whose ``forward`` takes an optional value input and key-padding mask.

There is deliberately no attention dropout: any dropout on the attention matrix makes PyTorch fall
back to the math kernel, which materialises the ``n x n`` matrix (gigabytes at 20k+ patches).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionImpl", "Attention", "Mlp", "Block", "attention_mask"]

AttentionImpl = Literal["sdpa", "explicit"]


def attention_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Key-padding mask ``[B, n]`` (True = real token) -> boolean SDPA mask ``[B, 1, 1, n]``.

    Returns ``None`` when every token is real, so the unmasked (fastest) kernel is used.
    A ``[B, 1, 1, n]`` mask keeps PyTorch's flash kernel (no ``n x n`` tensor is built).
    """
    if mask is None or bool(mask.all()):
        return None
    return mask[:, None, None, :]


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections.

    Args:
        dim: token width ``d``; must be divisible by ``num_heads``.
        num_heads: number of heads ``h`` (head width ``d_k = d / h``).
        qkv_bias: bias in the q/k/v projections.
        proj_drop: dropout after the output projection ``W_O``.
        impl: ``"sdpa"`` (memory-efficient kernels) or ``"explicit"`` (reference softmax).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        impl: AttentionImpl = "sdpa",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if impl not in ("sdpa", "explicit"):
            raise ValueError(f"attention must be 'sdpa' or 'explicit', got {impl!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.impl: AttentionImpl = impl
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # [B, h, n, d_k]

    def forward(
        self,
        x: torch.Tensor,
        value_input: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend over ``x`` ``[B, n, d]``.

        Args:
            x: queries and keys come from ``W_Q x`` and ``W_K x``.
            value_input: values come from ``W_V value_input`` (defaults to ``x``).
            mask: bool ``[B, n]``, True = real token; False keys get no attention.
        """
        b, n, d = x.shape
        q = self._heads(self.q(x))
        k = self._heads(self.k(x))
        v = self._heads(self.v(x if value_input is None else value_input))
        attn_mask = attention_mask(mask)
        if self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:
            logits = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            if attn_mask is not None:
                logits = logits.masked_fill(~attn_mask, float("-inf"))
            out = logits.softmax(dim=-1) @ v
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """``Linear -> GELU -> Dropout -> Linear -> Dropout`` (timm's ``Mlp`` names and arguments)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 drop: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class Block(nn.Module):
    """Pre-norm transformer block.

    ``x = x + Attn(LN1(x), value = LN1(x) + td)``; ``x = x + MLP(LN2(x))``.
    Without ``td`` this is the standard ViT block. With ``td`` (TDA-MIL step II) queries and keys
    are unchanged and only the values see the top-down signal.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 2.0,
        drop: float = 0.0,
        qkv_bias: bool = True,
        attention: AttentionImpl = "sdpa",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_drop=drop, impl=attention)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, max(1, int(round(dim * mlp_ratio))), drop=drop)

    def forward(
        self,
        x: torch.Tensor,
        td: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args: ``x`` ``[B, n, d]``; ``td`` optional top-down signal added to the value input;
        ``mask`` bool ``[B, n]`` key-padding mask (True = real token)."""
        h = self.norm1(x)
        x = x + self.attn(h, value_input=None if td is None else h + td, mask=mask)
        return x + self.mlp(self.norm2(x))
