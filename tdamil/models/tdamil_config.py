"""Configuration of TDA-MIL and of its bottom-up-only ablation, the plain transformer MIL.

Every field is documented where it is declared; the equations the fields act on are in
:mod:`tdamil.models.tdamil`, the measurements behind the defaults of the selection in
``benchmarks/digits_selection.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["TransformerMILConfig", "TDAMILConfig"]


@dataclass
class TransformerMILConfig:
    """Plain transformer MIL: TDA-MIL's projection, CLS token and step I, no top-down pass.

    Attributes:
        name: ``"transformer_mil"``.
        dim: token width ``d`` after the input projection (paper: not stated; 512).
        depth: number of transformer blocks ``L`` (2).
        num_heads: attention heads ``h`` (8); ``dim`` must be divisible by it.
        mlp_ratio: hidden width of each block's MLP as a multiple of ``dim``. 2.0 rather than ViT's 4.0:
            MIL bags have 5k-100k tokens, and the MLP activations dominate activation memory at that
            size (each 4.0-MLP layer would hold ``n x 4d`` floats twice for backward).
        dropout: dropout after the input projection, after attention's output projection and inside
            the MLPs (0.0). There is no attention-matrix dropout on purpose: it would force PyTorch's
            ``n x n`` math kernel.
        input_norm: LayerNorm over the raw ``D``-dim features before the projection (False).
        input_dropout: dropout on the raw features before the projection (0.0).
        qkv_bias: biases in the q/k/v projections (True).
        attention: ``"sdpa"`` (memory-efficient kernels, default) or ``"explicit"`` (reference
            ``softmax(QK^T/sqrt(d_k))V`` with an ``n x n`` matrix; for tests and the benchmark only).
    """

    name: Literal["transformer_mil"] = "transformer_mil"
    dim: int = 512
    depth: int = 2
    num_heads: int = 8
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    input_norm: bool = False
    input_dropout: float = 0.0
    qkv_bias: bool = True
    attention: Literal["sdpa", "explicit"] = "sdpa"

    def __post_init__(self) -> None:
        if self.dim < 1 or self.depth < 1 or self.num_heads < 1:
            raise ValueError("dim, depth and num_heads must be positive whole numbers")
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        for key in ("dropout", "input_dropout"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {value}")


@dataclass
class TDAMILConfig(TransformerMILConfig):
    """TDA-MIL. Inherits every field of :class:`TransformerMILConfig` and adds the top-down ones.

    Attributes:
        name: ``"tdamil"``.
        share_weights: step II reuses step I's blocks and final LayerNorm (True, as in the top-down
            attention work TDA-MIL builds on). False gives step II its own, independently initialised
            blocks and norm.
        channel_init: initial value of the channel matrix ``C``: ``"identity"`` (default) or
            ``"zeros"`` (the model then starts as a plain transformer and learns the top-down path).
        select_cls: whether the CLS token takes part in feature selection (gets its own ``s`` and a
            top-down signal). False (default): only patches are scored; the CLS token's ``x_TD`` is 0.
        decoder_ratio: hidden width of the top-down MLP decoder as a multiple of ``dim`` (2.0).
        decoder_bias: biases in the decoder (False, so ``s_i = 0`` gives ``x_i,TD = 0``).

    Training of the selection (issue #8; none of these changes the forward equation
    ``s_i = clamp(cos(x_i, T), 0, 1)``; measured in ``benchmarks/digits_selection.md``):

        task_init: how ``T`` starts. ``"contrast"`` (default): before the first training step the
            training engine shows the model up to ``task_init_bags`` labelled training bags
            (:meth:`TDAMIL.init_from_bags`), and ``T`` points from the mean scored token of the
            negative bags to that of the positive ones (positive as in the selection objective:
            label != 0). The selection thus starts with the right sign and on the evidence, a linear
            probe of "which patches make a bag positive" read off bag means: step-0 instance AUROC
            0.85-0.96 in every seed of the three digits variants, against 0.22-0.74 for ``"data"``
            (``benchmarks/digits_selection.md``). A training set with one class gives no direction;
            ``T`` then starts as with ``"signed"``, as it also does when a model is trained without
            the engine (on its first training forward pass). ``"data"``: on the first forward pass
            in training mode ``T`` takes the mean direction of that bag's scored patch tokens, so
            every patch starts selected; that direction is the shared offset of the features, which
            ranks rare evidence lowest (the WSI-like digits seed it fails). ``"signed"``: the
            random direction, its sign chosen on the first training bag so that at least half of
            that bag's patches start selected. ``"random"``: truncated normal (std 0.02), where
            0-99 % of ``s_i`` start at 0 depending on the seed. Every start keeps the norm of the
            random init (~0.16 at d = 64: Adam moves each coordinate by about ``lr`` per step, so a
            small ``T`` turns as fast as the rest of the model; a unit-norm ``T`` turned ~6x slower
            and the selection lagged the bag classifier by 20 epochs). A buffer,
            ``task_token_ready``, records that the start happened; checkpoints and federated
            weights carry it.
        task_init_bags: how many training bags ``"contrast"`` reads, in the first epoch's order
            (256; each bag's scored tokens are computed once, without gradients, one bag in memory).
        task_init_refine: witness refinement of the contrast start (:mod:`tdamil.models.task_start`,
            projected tokens only): up to this many steps (8), each moving ``T`` half way towards
            the direction from the negative bags' top ``task_init_top`` share of tokens (by cosine
            with the previous ``T``) to the positive bags'; the contrast start and every step are
            candidates, and the one whose selection logit separates the labelled bags best (bag
            AUROC, bag labels only) is kept. 0: off. A subsample of ``task_init_keep`` tokens per
            bag is held for it (at most 256 x 512 x d floats).
        start_candidates: restarts judged on the validation bags (``tdamil.train.engine.fit`` only:
            ``tdamil-train``; a federation's rounds start from the global model). ``K`` > 1 (default
            3): the model and ``K - 1`` copies from other initial weights (so other contrast starts
            of ``T``) are each trained ``start_candidate_epochs`` epochs on the same bags in the same
            order; the one with the lowest validation objective (cross-entropy + the selection
            objective on the validation bags: bag labels only, never instance labels) is kept and
            trained on. A start whose ``T`` settled among look-alike patches scores a selection
            objective near chance on bags it was not started on. Localisation (instance AUROC >=
            0.90 and top-1 >= 0.85) went from 6 to 9 of 10 seeds on tissue_mixture and from 8 to 9
            on latent_shift, digits unchanged in 2 of 3 seeds and within its figures in the third
            (``benchmarks/faithfulness.md``). Costs ``(K - 1) x start_candidate_epochs`` extra
            epochs, not more per epoch; skipped without validation bags or when the run has no
            more epochs than the candidates' (nothing to continue). 1: off.
        start_candidate_epochs: epochs each candidate is trained before the choice (3).
        proj_init: ``"data"`` (default): the input projection's bias is shifted so that the
            projected patch tokens have zero mean (with ``"contrast"``: over the bags it reads, each
            bag weighted equally; otherwise over the first training bag). This removes the shared
            offset of the features that squeezes every cosine into a narrow band, so about half of
            the patches start selected whatever the seed; without it the contrast ``T`` started
            with every ``s_i = 0`` in 1 of 10 seeds of the step-0 test. ``"random"``: PyTorch's
            init. With ``task_init="signed"`` the centred start inverted the selection in some
            seeds (a random direction on centred tokens), which ``"contrast"`` avoids.
        selection_grad: gradient of the clamp in the BACKWARD pass. ``"exact"``: the true gradient
            (0 outside ``[0, 1]``, so a patch at ``s_i = 0`` sends no gradient to ``T``). ``"leaky"``
            (default): outside ``[0, 1]`` the gradient is ``selection_slope`` times the cosine's, so a
            selection that went dead can come back. The forward value is the exact clamp.
        selection_slope: the leaky slope (0.1).
        selection_loss_weight: weight of the auxiliary MIL objective on the selection (1.0; 0 = off):
            binary cross-entropy between a bag logit pooled from the patch logits
            ``selection_temperature * (cos(x_i, T) - selection_margin)`` (the raw cosine, before the
            clamp, over the real patches; pooling: ``selection_mil``) and "the bag is positive". It
            ties the sign of the selection to the positive class: ``s_i`` rises on evidence for it;
            in a confidently negative bag every cosine is pushed below 0 (all ``s_i = 0``), in a
            positive bag the most relevant patch well above 0.
            Positive = label 1 for two classes; for more classes, any label other than 0 (class 0 is
            the normal/negative class), so ``T`` is relevant to "any abnormal class", not to one class.
            Added to the loss by :func:`tdamil.train.engine.train_one_epoch` (see :meth:`TDAMIL.auxiliary_loss`).
        selection_temperature: the scale of the cosine in that objective (30.0: a cosine 0.1 away
            from the margin is a logit of +-3; it is also the sharpness of the log-mean-exp pooling,
            which trails the max by at most ``log(n) / 30``, 0.15 for a 100-patch bag).
        selection_margin: the cosine at which that objective is undecided (0.25). Above 0, so a bag
            the objective finds borderline still shows its most relevant patches (``s_i`` in
            ``(0, margin)``) instead of a blank map; only a confidently negative bag is all 0.

    Against a selection that marks whole positive bags instead of their evidence (probes and the
    protocol runs in ``benchmarks/digits_selection.md``):

        selection_source: the tokens the cosine (and the data init of ``T``) is computed on.
            ``"projected"`` (default, chosen on validation bags in every seed): the projected
            patch tokens of ``x_0`` before step I, which self-attention has not mixed, so a patch's score
            depends on that patch only. ``"bottom_up"`` (the paper's equation): ``x_BU`` after step I.
            ``"pre_last"``: the tokens entering step I's last block (for
            ``depth = 1`` the projected ones), a middle ground. ``x_TD = Dec(C (s_i x_i,BU))`` still uses ``x_BU``.

    Further options:

        selection_sparsity_weight: weight of ``mean_i s_i`` per bag (averaged over bags) added to the
            auxiliary loss (0 = off): the MIL prior that a few patches carry the label.
        selection_mil: how the patch logits make the bag logit of that objective. ``"soft"``
            (default): their log-mean-exp, so every patch gets a share of the gradient
            (softmax-weighted) rather than only the current top one. ``"max"``: the top patch only;
            it can settle on a wrong top patch and stay there (digits seed 2: instance AUROC 0.51,
            top-1 hit 0.32 with ``max``; 0.96 / 0.95 with ``soft``). ``"instance"``: every patch of a
            NEGATIVE bag is a known negative (MIL assumption), so each cosine gets its own BCE against 0
            (mean over the bag's patches); a POSITIVE bag's logit pools the patch logits
            ``selection_temperature * (cos_i - selection_margin)`` by log-mean-exp, a soft top-k that
            needs a few high patches rather than one and spreads the gradient over them.
    """

    name: Literal["tdamil"] = "tdamil"  # type: ignore[assignment]
    share_weights: bool = True
    channel_init: Literal["identity", "zeros"] = "identity"
    select_cls: bool = False
    decoder_ratio: float = 2.0
    decoder_bias: bool = False
    task_init: Literal["contrast", "data", "signed", "random"] = "contrast"
    task_init_bags: int = 256
    task_init_refine: int = 8
    task_init_keep: int = 512
    task_init_top: float = 0.02
    start_candidates: int = 3
    start_candidate_epochs: int = 3
    proj_init: Literal["data", "random"] = "data"
    selection_grad: Literal["leaky", "exact"] = "leaky"
    selection_slope: float = 0.1
    selection_loss_weight: float = 1.0
    selection_temperature: float = 30.0
    selection_margin: float = 0.25
    selection_source: Literal["bottom_up", "projected", "pre_last"] = "projected"
    selection_sparsity_weight: float = 0.0
    selection_mil: Literal["soft", "max", "instance"] = "soft"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decoder_ratio <= 0:
            raise ValueError(f"decoder_ratio must be > 0, got {self.decoder_ratio}")
        if self.task_init not in ("data", "signed", "contrast", "random"):
            raise ValueError(f"task_init must be 'data', 'signed', 'contrast' or 'random', got {self.task_init!r}")
        if self.task_init_refine < 0 or self.task_init_keep < 1 or not 0 < self.task_init_top <= 1:
            raise ValueError("task_init_refine must be >= 0, task_init_keep >= 1 and task_init_top in (0, 1]")
        if self.start_candidates < 1 or self.start_candidate_epochs < 1:
            raise ValueError("start_candidates and start_candidate_epochs must be >= 1")
        if self.task_init_bags < 1:
            raise ValueError(f"task_init_bags must be >= 1, got {self.task_init_bags}")
        if self.proj_init not in ("data", "random"):
            raise ValueError(f"proj_init must be 'data' or 'random', got {self.proj_init!r}")
        if self.selection_grad not in ("leaky", "exact"):
            raise ValueError(f"selection_grad must be 'leaky' or 'exact', got {self.selection_grad!r}")
        if not 0.0 < self.selection_slope <= 1.0:
            raise ValueError(f"selection_slope must be in (0, 1], got {self.selection_slope}")
        if self.selection_loss_weight < 0 or self.selection_temperature <= 0:
            raise ValueError("selection_loss_weight must be >= 0 and selection_temperature > 0")
        if not -1.0 < self.selection_margin < 1.0:
            raise ValueError(f"selection_margin must be in (-1, 1), got {self.selection_margin}")
        if self.selection_source not in ("bottom_up", "projected", "pre_last"):
            raise ValueError(f"selection_source must be 'bottom_up', 'projected' or 'pre_last', got {self.selection_source!r}")
        if self.selection_sparsity_weight < 0:
            raise ValueError(f"selection_sparsity_weight must be >= 0, got {self.selection_sparsity_weight}")
        if self.selection_mil not in ("max", "instance", "soft"):
            raise ValueError(f"selection_mil must be 'max', 'instance' or 'soft', got {self.selection_mil!r}")
