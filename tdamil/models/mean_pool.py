"""Mean-pooling MIL baseline: ``logits = W_c mean_i ReLU(W x_i)``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from tdamil.models.output import MILOutput
from tdamil.models.tdamil import check_bag_input

__all__ = ["MeanPoolConfig", "MeanPoolMIL"]


@dataclass
class MeanPoolConfig:
    """Mean pooling settings.

    Attributes:
        name: ``"mean_pool"``.
        dim: width of the per-patch embedding before pooling (512).
        dropout: dropout on the per-patch embeddings (0.0).
    """

    name: Literal["mean_pool"] = "mean_pool"
    dim: int = 512
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError("dim must be a positive whole number")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class MeanPoolMIL(nn.Module):
    """Embed every patch, average over the bag's real patches, classify. ``scores`` is ``None``."""

    def __init__(self, cfg: MeanPoolConfig, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_dim = in_dim
        self.num_classes = num_classes
        self.embed = nn.Sequential(nn.Linear(in_dim, cfg.dim), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.head = nn.Linear(cfg.dim, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """``x`` float ``[B, n, D]``; ``mask`` bool ``[B, n]`` (True = real patch)."""
        x, mask = check_bag_input(x, mask, self.in_dim)
        h = self.embed(x)
        if mask is None:
            z = h.mean(dim=1)
        else:
            w = mask.to(h.dtype).unsqueeze(-1)
            z = (h * w).sum(dim=1) / w.sum(dim=1)
        return MILOutput(logits=self.head(z), scores=None)
