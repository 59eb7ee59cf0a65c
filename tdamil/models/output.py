"""The common return type of every MIL model in :mod:`tdamil.models`, and what each model's
per-patch scores mean (the one place that says so).

=================  ====================================================================================
model              ``scores`` (plotted on heatmaps, ranked by instance metrics)
=================  ====================================================================================
tdamil             ``s_i = clamp(cos(x_i, T), 0, 1)``: the feature-selection relevance, an absolute
                   value in [0, 1] comparable across slides. By default ``x_i`` is the patch's own
                   projected token (``selection_source="projected"``), so ``s_i`` depends on that
                   patch only; ``"bottom_up"`` (the paper) scores ``x_i,BU``, which self-attention has
                   mixed with the whole bag. With the default training (``selection_loss_weight >
                   0``) ``s_i > 0`` means "evidence for the positive class" and a negative slide may
                   have every ``s_i = 0``. Plotted on a fixed [0, 1] scale; pooled instance AUROC
                   uses ``s_i`` itself.
abmil,             attention weights ``a_i = softmax_i(...)``: they sum to 1 over a bag, so a patch of
gated_abmil        a 10-patch bag and one of a 10k-patch bag are not comparable. Heatmaps show them as
                   "attention" scaled per slide; within-bag metrics (top-1 hit, within-bag AUROC) use
                   them, pooled instance AUROC uses ``instance_logits`` (the pre-softmax logits,
                   which rank patches identically within a bag and are comparable across bags).
transformer_mil,   no per-patch scores (``None``): their CLS attention is spread over heads and
transmil,          layers and is not exposed by the memory-efficient attention kernel. No instance
mean_pool          metrics are reported for them.
=================  ====================================================================================
"""

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
            models without one (see the module docstring for each model's meaning). Padded positions
            (``mask`` False) are 0.
        instance_logits: ``[B, n]`` per-patch scores comparable across bags where ``scores`` are not
            (ABMIL's pre-softmax attention logits; -inf at padding), else ``None``.
        selection_logit: ``[B]`` TDA-MIL's bag-level selection logit, the patch logits
            ``selection_temperature * (cos(x_i, T) - selection_margin)`` pooled by log-mean-exp
            (default) or max (``TDAMILConfig.selection_mil``), the input of its auxiliary objective;
            ``None`` for the other models.
        selection_cosine: ``[B, n]`` TDA-MIL's ``cos(x_i, T)`` before the clamp (-inf at padding),
            for its per-patch selection terms; ``None`` for the other models.
    """

    logits: torch.Tensor
    scores: torch.Tensor | None = None
    instance_logits: torch.Tensor | None = None
    selection_logit: torch.Tensor | None = None
    selection_cosine: torch.Tensor | None = None
