"""TDA-MIL (Reisenbuechler et al., MICCAI 2025) and its bottom-up-only ablation.

Equations (SPEC.md section 1), for one bag ``X`` of ``n`` patch features in ``R^{n x D}``:

1. ``x_0 = [CLS; X W_in]`` (one linear layer ``D -> d``, learnable CLS token).
2. Step I (bottom-up): ``x_BU = LN(Blocks(x_0))`` with ``L`` pre-norm blocks
   (:class:`~tdamil.models.layers.Block`).
3. Feature selection: ``s_i = clamp(cos(x_i,BU, T), 0, 1)`` with a learnable task token ``T``;
   ``x_i,TD = Dec(C (s_i x_i,BU))`` with a learnable ``C in R^{d x d}`` and an MLP decoder ``Dec``.
   **Project default, one departure:** the cosine is taken on the patch's projected token ``x_i`` of
   ``x_0`` (``selection_source="projected"``), not on ``x_i,BU``. Step I's self-attention mixes every
   token with its bag, so on ``x_BU`` the score marks whole positive bags rather than their evidence
   (digits, seed 2: within-bag AUROC 0.35, top-1 hit 0.20 after 20 epochs; ``projected``: 0.98 /
   0.94); ``selection_source="bottom_up"`` is the paper's equation. ``C``, ``Dec`` and step II are
   unchanged: the top-down signal is still built from ``x_BU``.
4. Step II (top-down): the blocks run again on ``x_0``; in every block queries and keys come from
   the bottom-up stream and values from the stream plus the top-down signal:
   ``Attn(Q = W_Q LN1(h), K = W_K LN1(h), V = W_V(LN1(h) + x_TD))``. A linear head on the final
   (normalised) CLS token gives the logits.

Where the paper leaves a choice open it is a field of :class:`TDAMILConfig` (documented there).
Two structural choices are fixed here and worth knowing:

* Step II starts again from ``x_0`` (as in the analysis-by-synthesis top-down attention TDA-MIL builds
  on), and the same ``x_TD`` enters the values of every block. Hence, when ``x_TD = 0`` (e.g.
  ``C = 0``) and weights are shared, step II reproduces step I exactly.
* The decoder has no biases by default, so a patch with ``s_i = 0`` sends no top-down signal.

Bag size is never capped, cropped or sampled: attention runs through
:func:`torch.nn.functional.scaled_dot_product_attention`, whose memory grows linearly with ``n``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tdamil.models.layers import Attention, AttentionImpl, Block, Mlp
from tdamil.models.output import MILOutput
from tdamil.models.tdamil_config import TDAMILConfig, TransformerMILConfig

__all__ = ["TransformerMILConfig", "TDAMILConfig", "TransformerMIL", "TDAMIL", "TDAMILTrace", "check_bag_input"]


def check_bag_input(
    x: torch.Tensor, mask: torch.Tensor | None, in_dim: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate ``x`` ``[B, n, D]`` (a single ``[n, D]`` bag is accepted as ``B = 1``) and ``mask``.

    Returns ``(x, mask)`` with ``mask`` as bool ``[B, n]`` or ``None`` when absent.
    """
    if x.dim() == 2:
        x = x.unsqueeze(0)
        mask = None if mask is None else mask.reshape(1, -1)
    if x.dim() != 3:
        raise ValueError(f"expected patch features of shape [B, n, D], got {tuple(x.shape)}")
    if x.shape[-1] != in_dim:
        raise ValueError(
            f"features have {x.shape[-1]} channels but the model was built for in_dim={in_dim}; "
            "were the features made with a different encoder than the model expects?"
        )
    if x.shape[1] == 0:
        raise ValueError("empty bag: a slide needs at least one patch (check its tissue mask / feature file)")
    if mask is not None:
        if mask.shape != x.shape[:2]:
            raise ValueError(f"mask must have shape [B, n] = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
        mask = mask.to(device=x.device, dtype=torch.bool)
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every bag in the batch needs at least one real patch (mask True)")
    return x, mask


def _masked_mean(tokens: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Mean ``[d]`` of ``tokens`` ``[B, n, d]`` over every bag's real positions (``keep`` bool ``[B, n]``)."""
    w = tokens.new_ones(tokens.shape[:2]) if keep is None else keep.to(tokens.dtype)
    w = w.unsqueeze(-1)
    return (tokens * w).sum(dim=(0, 1)) / w.sum().clamp_min(1.0)


class _LeakyClamp(torch.autograd.Function):
    """``clamp(cos, 0, 1)`` whose backward pass passes ``slope`` x the gradient outside ``[0, 1]``.

    The same numbers as ``cos.clamp(0, 1) + slope * outside * (cos - cos.detach())`` (the gradient
    strictly inside ``(0, 1)``, ``gradient * slope`` outside ``[0, 1]`` and 0 at the bounds, as
    PyTorch's clamp gives them), in one autograd node instead of eight operations; the product with the bool
    ``keep`` mask of :meth:`TDAMIL.select` is taken in the same node (its backward step first, as
    autograd's own would)."""

    @staticmethod
    def forward(ctx, cos: torch.Tensor, slope: float, keep: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``clamp(cos, 0, 1) * keep`` (``keep`` bool, no gradient): the product in the same node."""
        ctx.save_for_backward(cos, keep)
        ctx.slope = slope
        return cos.clamp(0.0, 1.0) * keep

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        cos, keep = ctx.saved_tensors
        grad = grad * keep  # what the product's own backward step gave
        inside = (cos > 0) & (cos < 1)  # clamp's backward passes nothing at the bounds themselves
        outside = (cos < 0) | (cos > 1)
        return torch.where(inside, grad, torch.where(outside, grad * ctx.slope, 0.0)), None, None


class TransformerMIL(nn.Module):
    """Transformer MIL: projection + CLS + ``L`` pre-norm blocks + LayerNorm + linear head on CLS.

    This is TDA-MIL without the top-down pass (the ``transformer_mil`` ablation); parameter names are
    shared with :class:`TDAMIL`.
    """

    def __init__(self, cfg: TransformerMILConfig, in_dim: int, num_classes: int) -> None:
        super().__init__()
        if in_dim < 1 or num_classes < 1:
            raise ValueError(f"in_dim and num_classes must be positive, got {in_dim}, {num_classes}")
        self.cfg = cfg
        self.in_dim = in_dim
        self.num_classes = num_classes
        d = cfg.dim
        self.input_norm = nn.LayerNorm(in_dim) if cfg.input_norm else nn.Identity()
        self.input_drop = nn.Dropout(cfg.input_dropout)
        self.proj = nn.Linear(in_dim, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.proj_drop = nn.Dropout(cfg.dropout)
        self.blocks = self._make_blocks(cfg)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    @staticmethod
    def _make_blocks(cfg: TransformerMILConfig) -> nn.ModuleList:
        attention: AttentionImpl = cfg.attention
        return nn.ModuleList(
            Block(cfg.dim, cfg.num_heads, cfg.mlp_ratio, cfg.dropout, cfg.qkv_bias, attention)
            for _ in range(cfg.depth)
        )

    def set_attention(self, impl: AttentionImpl) -> None:
        """Switch every attention layer between ``"sdpa"`` and ``"explicit"`` (same weights)."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.impl = impl

    def embed(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` ``[B, n, D]`` -> tokens ``x_0 = [CLS; X W_in]`` ``[B, n+1, d]`` and their mask."""
        h = self.proj_drop(self.proj(self.input_drop(self.input_norm(x))))
        cls = self.cls_token.expand(h.shape[0], -1, -1)
        tokens = torch.cat([cls, h], dim=1)
        token_mask = None
        if mask is not None:
            token_mask = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
        return tokens, token_mask

    @staticmethod
    def run_blocks(
        blocks: Iterable[nn.Module],
        tokens: torch.Tensor,
        token_mask: torch.Tensor | None,
        td: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = tokens
        for block in blocks:
            h = block(h, td=td, mask=token_mask)
        return h

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """``x`` float ``[B, n, D]``; ``mask`` bool ``[B, n]`` (True = real patch)."""
        x, mask = check_bag_input(x, mask, self.in_dim)
        tokens, token_mask = self.embed(x, mask)
        h = self.norm(self.run_blocks(self.blocks, tokens, token_mask))
        return MILOutput(logits=self.head(h[:, 0]), scores=None)


@dataclass
class TDAMILTrace:
    """Intermediate tensors of one TDA-MIL forward pass (for tests, heatmaps and debugging).

    ``tokens`` = ``x_0`` ``[B, n+1, d]``; ``x_bu`` = step-I output after LayerNorm ``[B, n+1, d]``;
    ``scores`` = ``s_i`` ``[B, n]`` (patches only, 0 at padding); ``cosine`` = ``cos(x_i,BU, T)``
    before the clamp ``[B, n]`` (-inf at padding); ``cls_score`` = ``s_CLS`` ``[B]``
    or ``None`` when the CLS token does not take part; ``x_td`` ``[B, n+1, d]``; ``x_out`` = step-II
    output after LayerNorm ``[B, n+1, d]``; ``logits`` ``[B, c]``.
    """

    tokens: torch.Tensor
    x_bu: torch.Tensor
    scores: torch.Tensor
    cosine: torch.Tensor
    cls_score: torch.Tensor | None
    x_td: torch.Tensor
    x_out: torch.Tensor
    logits: torch.Tensor


class TDAMIL(TransformerMIL):
    """Top-Down Attention MIL. See the module docstring for the equations.

    Learnable top-down parameters: ``task_token`` (``T``, shape ``[d]``), ``channel_matrix``
    (``C``, ``[d, d]``), ``decoder`` (MLP); with ``share_weights=False`` also ``blocks_td`` and
    ``norm_td``.
    """

    def __init__(self, cfg: TDAMILConfig, in_dim: int, num_classes: int) -> None:
        super().__init__(cfg, in_dim, num_classes)
        self.cfg: TDAMILConfig = cfg
        d = cfg.dim
        self.task_token = nn.Parameter(torch.empty(d))
        nn.init.trunc_normal_(self.task_token, std=0.02)
        # 1.0 once T holds its initial value (from the start for task_init "random" with proj_init
        # "random"; before the first training step for "contrast"; after the first training bag
        # otherwise). A buffer, so checkpoints and federated weights carry it. Shape (1,),
        # never 0-d: Flower's DP clipping scales updates in place, which a 0-d array escapes (its
        # update stayed unclipped and every DP reply was dropped). Read as "> 0.5" because FedAvg
        # and DP noise make it a real number; below 0.5 a site re-initialises T from its data.
        self.register_buffer("task_token_ready", torch.full((1,), float(cfg.task_init == "random" and cfg.proj_init == "random")))
        init = torch.eye(d) if cfg.channel_init == "identity" else torch.zeros(d, d)
        self.channel_matrix = nn.Parameter(init)
        self.decoder = Mlp(d, max(1, int(round(d * cfg.decoder_ratio))), d, drop=cfg.dropout, bias=cfg.decoder_bias)
        # Shared weights are not registered twice, so state_dict() has no duplicate keys.
        self.blocks_td: nn.ModuleList | None = None if cfg.share_weights else self._make_blocks(cfg)
        self.norm_td: nn.LayerNorm | None = None if cfg.share_weights else nn.LayerNorm(d)

    def start_candidate(self, seed: int) -> "TDAMIL":
        """A fresh, untrained model of the same configuration from the initial weights of ``seed``
        (the global RNG untouched), on this model's device: one of the candidate starts of
        ``TDAMILConfig.start_candidates``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = type(self)(self.cfg, self.in_dim, self.num_classes)
        return fresh.to(self.task_token.device)

    @property
    def task_token_started(self) -> bool:
        """``task_token_ready`` read as a flag (> 0.5: FedAvg and DP noise make it a real number)."""
        return float(self.task_token_ready[0]) > 0.5

    @torch.no_grad()
    def _init_task_token(self, scored: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        """Give ``T`` its starting value from the first training bag (once; ``task_init`` != "random").

        Why: tokens share a common direction (a shared offset of the features survives the
        projection), so with a random ``T`` every cosine of a bag has the same sign and for about
        half of the seeds all ``s_i`` are 0. ``"data"``: ``T`` takes the mean direction of the bag's
        scored patch tokens, so every patch starts selected. ``"signed"``: ``T`` keeps its random
        direction and only its sign is chosen, so that at least half of the bag's patches start
        selected. Either way ``T`` keeps the norm of its random init (see :class:`TDAMILConfig`).
        """
        patches = scored[:, 1:].float()
        keep = None if token_mask is None else token_mask[:, 1:]
        task = self.task_token.float()
        if self.cfg.task_init == "data":
            task = F.normalize(_masked_mean(patches, keep), dim=0) * task.norm().clamp_min(1e-6)
        elif self.cfg.task_init in ("signed", "contrast"):  # "contrast" without labels: see TDAMILConfig
            cos = F.cosine_similarity(patches, task.view(1, 1, -1), dim=-1, eps=1e-8)
            if float((cos if keep is None else cos[keep]).gt(0).float().mean()) < 0.5:
                task = -task
        self.task_token.copy_(task.to(self.task_token.dtype))
        self.task_token_ready.fill_(1.0)

    def _clamp(self, cos: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``clamp(cos, 0, 1) * keep`` in the forward pass; with ``selection_grad="leaky"`` the backward
        pass gives ``selection_slope`` x the gradient outside ``[0, 1]`` instead of 0
        (:class:`_LeakyClamp`, one autograd node)."""
        if self.cfg.selection_grad == "leaky" and torch.is_grad_enabled() and cos.requires_grad:
            return _LeakyClamp.apply(cos, self.cfg.selection_slope, keep)
        return cos.clamp(0.0, 1.0) * keep

    def select(
        self, x_bu: torch.Tensor, token_mask: torch.Tensor | None, scored: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Feature selection: ``s = clamp(cos(x_BU, T), 0, 1)`` and ``x_TD = Dec(C (s x_BU))``.

        ``scored``: the tokens the cosine is taken on when not ``x_BU`` (``selection_source``). Returns ``(s, cos, x_td)`` with ``s`` ``[B, n+1]`` (index 0 = CLS, 0 unless ``select_cls``;
        0 at padding), the unclamped cosine ``cos`` ``[B, n+1]`` and ``x_td`` ``[B, n+1, d]`` (0
        wherever ``s`` does not apply).
        """
        scored = x_bu if scored is None else scored
        if self.training and not self.task_token_started:
            self._init_task_token(scored, token_mask)
        cos = F.cosine_similarity(scored, self.task_token.view(1, 1, -1), dim=-1, eps=1e-8)
        keep = torch.ones_like(cos, dtype=torch.bool) if token_mask is None else token_mask.clone()
        if not self.cfg.select_cls:
            keep[:, 0] = False
        s = self._clamp(cos, keep)
        rescaled = (s.unsqueeze(-1) * x_bu) @ self.channel_matrix.t()
        x_td = self.decoder(rescaled) * keep.unsqueeze(-1)
        return s, cos, x_td

    @torch.no_grad()
    def _center_projection(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        """``proj_init="data"``: shift the input projection's bias so that the first training bag's
        projected patch tokens have zero mean (once, before ``T`` is initialised on them)."""
        mean = _masked_mean(self.proj(self.input_norm(x)).float(), mask)
        self.proj.bias.sub_(mean.to(self.proj.bias.dtype))

    @property
    def awaits_labelled_init(self) -> bool:
        """True while ``T`` waits for :meth:`init_from_bags` (``task_init="contrast"``, not started yet)."""
        return self.cfg.task_init == "contrast" and not self.task_token_started

    def _bottom_up(self, tokens: torch.Tensor, token_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Step I, split to expose the last block's input: ``(pre_last, x_BU)``."""
        # a list slice: slicing the ModuleList itself builds a new Module on every call
        pre_last = self.run_blocks(list(self.blocks)[:-1], tokens, token_mask)
        return pre_last, self.norm(self.blocks[-1](pre_last, mask=token_mask))

    def _scored(self, tokens: torch.Tensor, pre_last: torch.Tensor, x_bu: torch.Tensor) -> torch.Tensor:
        """The tokens the cosine is taken on (``selection_source``)."""
        return {"projected": tokens, "pre_last": pre_last}.get(self.cfg.selection_source, x_bu)

    def _scored_patches(self, x: torch.Tensor) -> torch.Tensor:
        """The ``[n, d]`` patch tokens the cosine is taken on for one bag ``[n, D]`` (step I only when needed)."""
        tokens, _ = self.embed(x.unsqueeze(0), None)
        if self.cfg.selection_source == "projected":
            return tokens[0, 1:]
        return self._scored(tokens, *self._bottom_up(tokens, None))[0, 1:]

    @torch.no_grad()
    def init_from_bags(self, bags: Iterable[tuple[torch.Tensor, int]]) -> dict[str, int]:
        """``task_init="contrast"``: start ``T`` from labelled training bags (see :class:`TDAMILConfig`).

        ``bags``: ``(features [n, D], label)`` pairs, read once, at most ``task_init_bags`` of them
        (one bag in memory at a time). With ``proj_init="data"`` the projection is first centred on
        the first bag, the direction is read with it, and then the bias takes the mean over every
        bag read. ``T`` = the mean over positive bags (label != 0) of their mean scored
        token minus the same over negative bags, at the norm of its random init. With one class
        ``T`` starts as with ``"signed"`` on the first bag. Returns the number of bags read, and
        of positive ones.
        """
        if not self.awaits_labelled_init:
            return {"bags": 0, "positive": 0}
        was_training = self.training
        self.eval()  # the direction is read without dropout
        try:
            return self._contrast_start(bags)
        finally:
            self.train(was_training)

    def _contrast_start(self, bags: Iterable[tuple[torch.Tensor, int]]) -> dict[str, int]:
        """The body of :meth:`init_from_bags` (in eval mode, without gradients)."""
        sums: dict[bool, torch.Tensor | float] = {True: 0.0, False: 0.0}
        counts = {True: 0, False: 0}
        projected_means: list[torch.Tensor] = []
        kept: list[torch.Tensor] = []  # a subsample of each bag's scored tokens, for the witness refinement
        kept_labels: list[bool] = []
        first: torch.Tensor | None = None
        gen = torch.Generator().manual_seed(0)
        for x, label in itertools.islice(bags, self.cfg.task_init_bags):
            x = x.to(self.proj.weight.device, self.proj.weight.dtype)
            if first is None:
                first = x
                if self.cfg.proj_init == "data":
                    self._center_projection(x.unsqueeze(0), None)
            tokens = self.proj(self.input_norm(x)).float()  # the projected tokens (eval mode)
            projected = tokens.mean(dim=0)
            mean = projected if self.cfg.selection_source == "projected" else self._scored_patches(x).float().mean(dim=0)
            positive = int(label) != 0
            sums[positive] = sums[positive] + mean
            counts[positive] += 1
            projected_means.append(projected)
            if self.cfg.task_init_refine > 0 and self.cfg.selection_source == "projected":
                if tokens.shape[0] > self.cfg.task_init_keep:
                    tokens = tokens[torch.randperm(tokens.shape[0], generator=gen)[: self.cfg.task_init_keep]]
                kept.append(tokens)
                kept_labels.append(positive)
        if first is None:
            return {"bags": 0, "positive": 0}
        shift = torch.stack(projected_means).mean(dim=0)
        if self.cfg.proj_init == "data":
            self.proj.bias.sub_(shift.to(self.proj.bias.dtype))
        if counts[True] and counts[False]:
            direction = sums[True] / counts[True] - sums[False] / counts[False]
            if kept:
                direction = self._refined(kept, kept_labels, direction, shift if self.cfg.proj_init == "data" else None)
            task = F.normalize(direction, dim=0) * self.task_token.float().norm().clamp_min(1e-6)
            self.task_token.copy_(task.to(self.task_token.dtype))
        else:
            self._init_task_token(F.pad(self._scored_patches(first), (0, 0, 1, 0)).unsqueeze(0), None)  # row 0 = CLS slot
        self.task_token_ready.fill_(1.0)
        return {"bags": counts[True] + counts[False], "positive": counts[True]}

    def _refined(self, kept: list[torch.Tensor], labels: list[bool], start: torch.Tensor,
                 shift: torch.Tensor | None) -> torch.Tensor:
        """The contrast start or a witness refinement of it, whichever separates the labelled bags
        best (:mod:`tdamil.models.task_start`); the tokens are centred as the projection now is."""
        from tdamil.models.task_start import choose, witness_refinement  # noqa: PLC0415

        bags = [x - shift for x in kept] if shift is not None else kept
        candidates = witness_refinement(bags, labels, start, steps=self.cfg.task_init_refine,
                                        top=self.cfg.task_init_top)
        best, scores = choose(bags, labels, candidates, temperature=self.cfg.selection_temperature,
                              margin=self.cfg.selection_margin)
        self.task_start_choice = (best, scores)
        return candidates[best]

    def forward_trace(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> TDAMILTrace:
        """Run the model and return every intermediate (see :class:`TDAMILTrace`)."""
        return self._trace(*check_bag_input(x, mask, self.in_dim))

    def _trace(self, x: torch.Tensor, mask: torch.Tensor | None) -> TDAMILTrace:
        """:meth:`forward_trace` on a checked bag (``x`` ``[B, n, D]``, ``mask`` bool ``[B, n]`` or None)."""
        if self.training and self.cfg.proj_init == "data" and not self.task_token_started:
            self._center_projection(x, mask)
        tokens, token_mask = self.embed(x, mask)
        pre_last, x_bu = self._bottom_up(tokens, token_mask)  # step I
        s, cos, x_td = self.select(x_bu, token_mask, self._scored(tokens, pre_last, x_bu))
        blocks_td = self.blocks if self.blocks_td is None else self.blocks_td
        norm_td = self.norm if self.norm_td is None else self.norm_td
        x_out = norm_td(self.run_blocks(blocks_td, tokens, token_mask, td=x_td))  # step II
        return TDAMILTrace(
            tokens=tokens,
            x_bu=x_bu,
            scores=s[:, 1:],
            cosine=cos[:, 1:] if token_mask is None else cos[:, 1:].masked_fill(~token_mask[:, 1:], float("-inf")),
            cls_score=s[:, 0] if self.cfg.select_cls else None,
            x_td=x_td,
            x_out=x_out,
            logits=self.head(x_out[:, 0]),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """``x`` float ``[B, n, D]``; ``mask`` bool ``[B, n]`` (True = real patch).

        Returns :class:`MILOutput` with ``scores = s_i`` over the patches (``[B, n]``, in ``[0, 1]``),
        ``selection_cosine`` (the cosines, -inf at padding) and ``selection_logit`` ``[B]``: with
        ``selection_mil="max"`` ``selection_temperature * (max_i cos_i - selection_margin)``; with
        ``"soft"`` or ``"instance"`` the log-mean-exp over the patches of
        ``selection_temperature * (cos_i - selection_margin)``.
        """
        x, mask = check_bag_input(x, mask, self.in_dim)
        trace = self._trace(x, mask)
        cfg = self.cfg
        if cfg.selection_mil == "max":
            logit = cfg.selection_temperature * (trace.cosine.max(dim=1).values - cfg.selection_margin)
        else:
            per_patch = cfg.selection_temperature * (trace.cosine - cfg.selection_margin)  # -inf at padding
            # the real patches: those of the mask (where the cosine is finite), counted without a pass over it
            n_real = (per_patch.new_full(per_patch.shape[:1], per_patch.shape[1]) if mask is None
                      else mask.sum(dim=1).to(per_patch.dtype))
            logit = torch.logsumexp(per_patch, dim=1) - n_real.log()
        return MILOutput(logits=trace.logits, scores=trace.scores, selection_logit=logit, selection_cosine=trace.cosine)

    def auxiliary_loss(self, out: MILOutput, target: torch.Tensor) -> torch.Tensor | None:
        """The selection objective, or None when it is off. ``target`` holds class indices ``[B]``.

        ``selection_loss_weight`` x BCE of ``selection_logit`` against "label != 0" (with
        ``selection_mil="instance"`` a negative bag's term is the mean BCE of each patch against 0),
        plus ``selection_sparsity_weight`` x the mean of ``s_i`` over each bag's real patches."""
        cfg = self.cfg
        if (cfg.selection_loss_weight == 0 and cfg.selection_sparsity_weight == 0) or out.selection_logit is None:
            return None
        logit = out.selection_logit.float()
        positive = (target != 0).to(logit.dtype)
        real = None  # the real patches, only where a term needs them
        if out.selection_cosine is not None and (cfg.selection_mil == "instance" or cfg.selection_sparsity_weight > 0):
            real = torch.isfinite(out.selection_cosine)
        if cfg.selection_mil in ("max", "soft") or real is None:
            bce = F.binary_cross_entropy_with_logits(logit, positive)
        else:
            patch_logit = cfg.selection_temperature * (out.selection_cosine.float() - cfg.selection_margin)
            per_patch = F.softplus(patch_logit).masked_fill(~real, 0.0)  # BCE of each patch against 0
            negative_term = per_patch.sum(dim=1) / real.sum(dim=1)
            bce = torch.where(positive > 0, F.softplus(-logit), negative_term).mean()
        loss = bce if cfg.selection_loss_weight == 1.0 else cfg.selection_loss_weight * bce  # x 1.0 is exact: one op less
        if cfg.selection_sparsity_weight > 0 and out.scores is not None and real is not None:
            density = (out.scores.float() * real).sum(dim=1) / real.sum(dim=1)
            loss = loss + cfg.selection_sparsity_weight * density.mean()
        return loss
