"""The common return type of every MIL model in :mod:`tdamil.models`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MILOutput"]


@dataclass
class MILOutput:
    """What a MIL model's ``forward`` returns.

    Attributes:
        logits: ``[B, num_classes]`` unnormalised class scores (apply softmax for probabilities).
        scores: ``[B, n]`` per-patch relevance, aligned with the input patches, or ``None`` for
            models without one (mean pooling, plain transformer). TDA-MIL gives its feature-selection
            scores ``s_i`` in ``[0, 1]``; ABMIL its attention weights (summing to 1 per bag).
            Padded positions (``mask`` False) are 0.
    """

    logits: torch.Tensor
    scores: torch.Tensor | None = None
