"""Is a relevance map faithful? A label-free deletion check of a model's per-patch scores.

A map can point at the wrong patches while the bag classifier is right (TDA-MIL's selection on a
bad start; attention that spreads over context): the slide is classified correctly and the heatmap
misleads. Without instance labels the map can still be tested against the model itself: if the
patches it ranks highest carry the evidence for the predicted class, deleting them must lower the
predicted probability more than deleting as many patches at random.

For a bag predicted positive (probability ``p0 >= 0.5`` of the positive class, no label used):

* ``ordered(k)``: the positive probability after removing the ``k`` highest-scoring patches
  (ties broken at random: TDA-MIL gives many patches ``s_i = 0``);
* ``random(k)``: the mean positive probability after removing ``k`` random patches (``draws``
  draws);
* for ``k = max(1, round(f n))``, ``f`` in :data:`FRACTIONS` (1 % to half of the bag: evidence on a
  slide may be rare or cover a third of it), the bag's **deletion gap** is the mean of
  ``random(k) - ordered(k)``.

A faithful map has a clearly positive gap on most such bags; a map on the wrong patches has a gap
near 0 (its top patches are as good as random ones). :func:`check_model` summarises a model over up
to ``max_bags`` predicted-positive bags (mean gap, share of bags with a positive gap, a one-sided
sign test) and gives a verdict; :func:`check_bag` does one slide (``tdamil-predict``). The same
check applies to any model with per-patch scores (TDA-MIL ``s_i``, ABMIL attention), so maps are
comparable across models; models without scores get no verdict.

The thresholds (:data:`MIN_GAP`, :data:`MAX_P`) were set after a first benchmark run
(benchmarks/faithfulness.md: faithful maps scored gaps of 0.28-0.85 on three generators, maps on
the wrong patches -0.02 to 0.16) and confirmed on new seeds; they are properties of MIL models that
classify by their evidence, and a model whose prediction rests on context more than on its top
patches will be flagged, which is what the flag is for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch

from tdamil.train.runtime import logits_of

__all__ = ["FRACTIONS", "MIN_GAP", "MAX_P", "BagDeletion", "Faithfulness", "check_bag", "check_model"]

FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
MIN_GAP = 0.2  # mean deletion gap (probability) a faithful map reaches
MAX_P = 0.05  # one-sided sign test over bags: gap > 0 more often than chance


@dataclass
class BagDeletion:
    """One bag's deletion check: the sizes deleted, probabilities after ordered / random deletion."""

    p0: float
    ks: list[int]
    ordered: list[float]
    random: list[float]

    @property
    def gap(self) -> float:
        return float(np.mean(np.asarray(self.random) - np.asarray(self.ordered))) if self.ks else float("nan")


@dataclass
class Faithfulness:
    """A model's deletion check over its predicted-positive bags.

    bags:       bags checked (predicted positive, at most ``max_bags``).
    mean_gap:   mean deletion gap (probability points); NaN without bags.
    positive:   share of bags whose gap is > 0.
    p_value:    one-sided sign test that gaps are positive more often than not.
    verdict:    ``faithful`` | ``not faithful`` | ``n/a`` (no scores, or no predicted-positive bag).
    note:       why there is no verdict, where :meth:`sentence` cannot tell from ``bags`` alone
                (e.g. ``not a two-class model``).
    """

    bags: int
    mean_gap: float
    positive: float
    p_value: float
    verdict: str
    note: str = ""

    @property
    def flagged(self) -> bool:
        return self.verdict == "not faithful"

    def sentence(self, what: str = "the relevance map") -> str:
        """The verdict in plain words (logs, reports, heatmap notes)."""
        if self.verdict == "n/a":
            why = self.note or ("no per-patch scores" if self.bags < 0 else "no slide predicted positive")
            return f"{what}: faithfulness not checked ({why})"
        if self.verdict == "faithful":
            return (f"{what} is faithful: deleting its top patches lowers the positive probability by "
                    f"{self.mean_gap:.2f} more than deleting random ones ({self.bags} slides, p = {self.p_value:.2g})")
        return (f"WARNING: {what} is NOT faithful: deleting its top patches changes the prediction about as much "
                f"as deleting random ones (gap {self.mean_gap:.2f}, {self.bags} slides, p = {self.p_value:.2g}); "
                "do not read the heatmaps as evidence")


def _positive_prob(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """P(class 1) for a batch of equal-size bags ``x`` [B, n, D]."""
    return torch.softmax(logits_of(model(x)).float(), dim=-1)[:, 1]


def _scores(out: Any) -> Optional[np.ndarray]:
    s = getattr(out, "instance_logits", None)
    if s is None:
        s = getattr(out, "scores", None)
    return None if s is None else s[0].float().cpu().numpy()


@torch.no_grad()
def check_bag(model: torch.nn.Module, features: torch.Tensor, scores: np.ndarray | None = None, *,
              p0: float | None = None, draws: int = 4, seed: int = 0, fractions: tuple[float, ...] = FRACTIONS,
              positive_only: bool = False) -> Optional[BagDeletion]:
    """The deletion check of one bag ``features`` [n, D] (``scores``: the model's own by default;
    ``p0``: its positive probability, when the caller has both from its own forward pass, which is
    then not run again). Returns None when the model has no per-patch scores or the bag is too
    small (< 2 patches); with ``positive_only`` a bag predicted negative gets no deletions."""
    was_training = model.training
    model.eval()
    try:
        x = features.unsqueeze(0)
        if scores is None or p0 is None:
            out = model(x)
            scores = _scores(out) if scores is None else scores
            p0 = float(torch.softmax(logits_of(out).float(), dim=-1)[0, 1])
        if scores is None or features.shape[0] < 2:
            return None
        if positive_only and p0 < 0.5:
            return BagDeletion(p0, [], [], [])
        n = features.shape[0]
        rng = np.random.default_rng(seed)
        ks = sorted({min(n - 1, max(1, round(f * n))) for f in fractions})
        order = np.lexsort((rng.random(n), -np.asarray(scores, dtype=np.float64)))  # by score, ties at random
        ordered, randoms = [], []
        for k in ks:
            keep = np.sort(order[k:])
            ordered.append(float(_positive_prob(model, x[:, keep])[0]))
            batch = torch.stack([features[np.sort(rng.permutation(n)[k:])] for _ in range(draws)])
            randoms.append(float(_positive_prob(model, batch).mean()))
        return BagDeletion(p0, ks, ordered, randoms)
    finally:
        model.train(was_training)


def _sign_test(gaps: np.ndarray) -> float:
    """One-sided binomial p-value of seeing this many positive gaps (ties dropped) under p = 0.5."""
    pos, n = int((gaps > 0).sum()), int((gaps != 0).sum())
    if n == 0:
        return 1.0
    return float(sum(math.comb(n, j) for j in range(pos, n + 1)) / 2 ** n)


def summarise(deletions: list[BagDeletion], has_scores: bool = True) -> Faithfulness:
    """The verdict over bags' deletion checks (see the module docstring for the thresholds)."""
    if not has_scores:
        return Faithfulness(-1, float("nan"), float("nan"), float("nan"), "n/a")
    if not deletions:
        return Faithfulness(0, float("nan"), float("nan"), float("nan"), "n/a")
    gaps = np.asarray([d.gap for d in deletions])
    p = _sign_test(gaps)
    mean = float(gaps.mean())
    verdict = "faithful" if mean >= MIN_GAP and p < MAX_P else "not faithful"
    if len(deletions) < 5 and mean >= MIN_GAP:  # too few slides for the sign test: the gap decides
        verdict = "faithful"
    return Faithfulness(len(deletions), mean, float((gaps > 0).mean()), p, verdict)


@torch.no_grad()
def check_model(model: torch.nn.Module, dataset: Any, *, max_bags: int = 64, draws: int = 4, seed: int = 0,
                device: Any = None, indices: Optional[Sequence[int]] = None) -> Faithfulness:
    """The deletion check over up to ``max_bags`` bags of ``dataset`` the model predicts positive
    (binary models; labels are never read), taken in the order of ``indices`` (all bags in order by
    default: a pooled dataset can be interleaved so that its first part does not fill the quota)."""
    dev = device if device is not None else next(model.parameters()).device
    deletions: list[BagDeletion] = []
    has_scores = True
    for i in (range(len(dataset)) if indices is None else indices):
        i = int(i)
        if len(deletions) >= max_bags:
            break
        features = dataset[i].features.to(dev)
        result = check_bag(model, features, draws=draws, seed=seed + i, positive_only=True)
        if result is None:
            if features.shape[0] >= 2:
                has_scores = False
                break
            continue
        if result.p0 >= 0.5:
            deletions.append(result)
    return summarise(deletions, has_scores)
