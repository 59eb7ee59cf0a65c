"""TransMIL (Shao et al., NeurIPS 2021) with standard attention.

Per bag: ``h = ReLU(W x)``; pad the patch sequence to a square ``H x H`` (``H = ceil(sqrt(n))``) by
repeating its first patches; prepend a CLS token; transformer layer; PPEG (pyramid position encoding:
the patch tokens reshaped to ``H x H`` plus depthwise 7x7, 5x5 and 3x3 convolutions); transformer
layer; LayerNorm; linear head on CLS.

Difference from the paper, on purpose: the layers use exact softmax attention through
:func:`torch.nn.functional.scaled_dot_product_attention` (memory linear in ``n``) instead of the
Nystrom approximation, so results do not depend on landmark count and no extra package is needed.
Like the original, a transformer layer is ``x + Attn(LN(x))`` (no MLP).

Bags in a padded batch are processed one at a time on their real patches (the square padding depends
on each bag's own size), so padding never changes a bag's result. ``scores`` is ``None``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from tdamil.models.layers import Attention
from tdamil.models.output import MILOutput
from tdamil.models.tdamil import check_bag_input

__all__ = ["TransMILConfig", "TransMIL", "PPEG"]


@dataclass
class TransMILConfig:
    """TransMIL settings.

    Attributes:
        name: ``"transmil"``.
        dim: token width (512, as the paper).
        num_heads: attention heads (8, as the paper).
        dropout: dropout after the input projection and attention output (0.0).
        attention: ``"sdpa"`` (default) or ``"explicit"`` reference softmax.
    """

    name: Literal["transmil"] = "transmil"
    dim: int = 512
    num_heads: int = 8
    dropout: float = 0.0
    attention: Literal["sdpa", "explicit"] = "sdpa"

    def __post_init__(self) -> None:
        if self.dim < 1 or self.num_heads < 1:
            raise ValueError("dim and num_heads must be positive whole numbers")
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class PPEG(nn.Module):
    """Pyramid position encoding generator: ``f + DW7(f) + DW5(f) + DW3(f)`` on the ``H x H`` grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.conv5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, tokens: torch.Tensor, side: int) -> torch.Tensor:
        """``tokens`` ``[B, 1 + side^2, d]`` (CLS first) -> same shape with positions encoded."""
        cls, patches = tokens[:, :1], tokens[:, 1:]
        b, n, d = patches.shape
        grid = patches.transpose(1, 2).reshape(b, d, side, side)
        grid = grid + self.conv7(grid) + self.conv5(grid) + self.conv3(grid)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


class _TransLayer(nn.Module):
    def __init__(self, cfg: TransMILConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.num_heads, proj_drop=cfg.dropout, impl=cfg.attention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm(x))


class TransMIL(nn.Module):
    """TransMIL with PPEG and exact (SDPA) attention."""

    def __init__(self, cfg: TransMILConfig, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_dim = in_dim
        self.num_classes = num_classes
        self.embed = nn.Sequential(nn.Linear(in_dim, cfg.dim), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.layer1 = _TransLayer(cfg)
        self.pos = PPEG(cfg.dim)
        self.layer2 = _TransLayer(cfg)
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, num_classes)

    def _one_bag(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[1, n, D]`` -> logits ``[1, c]``."""
        h = self.embed(x)
        n = h.shape[1]
        side = math.ceil(math.sqrt(n))
        extra = side * side - n
        if extra:
            h = torch.cat([h, h[:, torch.arange(extra, device=h.device) % n]], dim=1)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        h = self.layer2(self.pos(self.layer1(h), side))
        return self.head(self.norm(h)[:, 0])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """``x`` float ``[B, n, D]``; ``mask`` bool ``[B, n]`` (True = real patch)."""
        x, mask = check_bag_input(x, mask, self.in_dim)
        if mask is None:
            if x.shape[0] == 1:
                return MILOutput(logits=self._one_bag(x), scores=None)
            bags = [x[i : i + 1] for i in range(x.shape[0])]
        else:
            bags = [x[i : i + 1, mask[i]] for i in range(x.shape[0])]
        return MILOutput(logits=torch.cat([self._one_bag(b) for b in bags], dim=0), scores=None)
