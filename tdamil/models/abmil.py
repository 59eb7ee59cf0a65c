"""Attention-based MIL (Ilse, Tomczak and Welling, ICML 2018), plain and gated.

``h_i = ReLU(W x_i)``; attention ``a_i = softmax_i(w^T tanh(V h_i))`` (plain) or
``a_i = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i)))`` (gated); bag embedding ``z = sum_i a_i h_i``;
``logits = W_c z``. ``scores`` are the attention weights ``a_i`` (sum to 1 over a bag's real patches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from tdamil.models.output import MILOutput
from tdamil.models.tdamil import check_bag_input

__all__ = ["ABMILConfig", "ABMIL"]


@dataclass
class ABMILConfig:
    """ABMIL settings.

    Attributes:
        name: ``"abmil"`` or ``"gated_abmil"`` (gated attention).
        dim: width of the instance embedding ``h_i`` (512).
        attn_dim: width of the attention network (128, as Ilse et al.).
        dropout: dropout on the instance embeddings (0.0).
    """

    name: Literal["abmil", "gated_abmil"] = "abmil"
    dim: int = 512
    attn_dim: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.dim < 1 or self.attn_dim < 1:
            raise ValueError("dim and attn_dim must be positive whole numbers")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def gated(self) -> bool:
        return self.name == "gated_abmil"


class ABMIL(nn.Module):
    """(Gated) attention MIL pooling with a linear classifier."""

    def __init__(self, cfg: ABMILConfig, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_dim = in_dim
        self.num_classes = num_classes
        self.embed = nn.Sequential(nn.Linear(in_dim, cfg.dim), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.attention_v = nn.Linear(cfg.dim, cfg.attn_dim)
        self.attention_u = nn.Linear(cfg.dim, cfg.attn_dim) if cfg.gated else None
        self.attention_w = nn.Linear(cfg.attn_dim, 1)
        self.head = nn.Linear(cfg.dim, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """``x`` float ``[B, n, D]``; ``mask`` bool ``[B, n]`` (True = real patch)."""
        x, mask = check_bag_input(x, mask, self.in_dim)
        h = self.embed(x)
        gate = torch.tanh(self.attention_v(h))
        if self.attention_u is not None:
            gate = gate * torch.sigmoid(self.attention_u(h))
        a = self.attention_w(gate).squeeze(-1)  # [B, n]
        if mask is not None:
            a = a.masked_fill(~mask, float("-inf"))
        weights = a.softmax(dim=1)
        z = torch.einsum("bn,bnd->bd", weights, h)
        return MILOutput(logits=self.head(z), scores=weights, instance_logits=a)
