"""The label-free deletion check of relevance maps (tdamil.train.faithfulness)."""

from __future__ import annotations

import torch
from torch import nn

from evidence_bags import evidence_bags

from tdamil.data.bags import InMemoryBagDataset
from tdamil.models.output import MILOutput
from tdamil.train.faithfulness import check_bag, check_model


class MaxMIL(nn.Module):
    """A fixed MIL model: the bag is positive when some patch has a high first feature. Its
    per-patch scores are that feature (``faithful``), its negative, or noise."""

    def __init__(self, scores: str) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.kind = scores

    def forward(self, x: torch.Tensor) -> MILOutput:
        evidence = x[..., 0]
        bag = torch.logsumexp(3 * evidence, dim=-1) / 3 - 2.0
        logits = torch.stack([torch.zeros_like(bag), self.scale * bag], dim=-1)
        scores = {"faithful": evidence, "inverted": -evidence,
                  "noise": torch.sin(1000 * x[..., 1])}[self.kind]
        return MILOutput(logits=logits, scores=scores)


def _bags(n_bags: int = 30, seed: int = 0) -> InMemoryBagDataset:
    return evidence_bags(n_bags, seed, (60, 200), 4)


def test_a_map_on_the_evidence_is_faithful_and_one_elsewhere_is_flagged():
    data = _bags()
    good = check_model(MaxMIL("faithful"), data)
    assert good.verdict == "faithful" and good.mean_gap > 0.2 and good.p_value < 0.01, good
    assert 15 <= good.bags < 30  # only the bags predicted positive (labels are never read)
    for kind in ("inverted", "noise"):
        bad = check_model(MaxMIL(kind), data)
        assert bad.verdict == "not faithful" and bad.flagged and abs(bad.mean_gap) < 0.1, (kind, bad)
        assert "NOT faithful" in bad.sentence()
    assert "is faithful" in good.sentence()


def test_one_slide_deletion_curve_and_models_without_scores():
    x = _bags(2)[1].features
    curve = check_bag(MaxMIL("faithful"), x, draws=8)
    assert curve is not None and curve.p0 > 0.5 and curve.ks[0] == 1
    assert curve.ordered[-1] < 0.5 < curve.random[-1] and curve.gap > 0.2  # both evidence patches gone

    class NoScores(MaxMIL):
        def forward(self, x):
            return MILOutput(logits=super().forward(x).logits)

    assert check_bag(NoScores("faithful"), x) is None
    none = check_model(NoScores("faithful"), _bags(6))
    assert none.verdict == "n/a" and "no per-patch scores" in none.sentence()
